"""Stage 2 on every torchrun rank: ``torchrun --nproc-per-node N -m pipeline.distributed.train_ldm spec.json``."""

import sys

from pipeline.distributed.entry import main

if __name__ == "__main__":
    sys.exit(main("ldm"))
