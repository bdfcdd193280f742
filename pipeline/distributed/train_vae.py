"""Stage 1 on every torchrun rank: ``torchrun --nproc-per-node N -m pipeline.distributed.train_vae spec.json``."""

import sys

from pipeline.distributed.entry import main

if __name__ == "__main__":
    sys.exit(main("vae"))
