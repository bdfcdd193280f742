"""Training loops. Each stage has one entry point (`train_autoencoder`, `train_ldm`); the two differ only in their
model and their step, and share the rest:

    config.py      the fields every trainer's config has (`TrainerConfig`)
    run_setup.py   the run setup: device, precision, this process's rank, the split of the global batch, the
                   seeded generator; what a checkpoint saves of a trainer's parts; the start every rank waits for
    data_order.py  the resumable batch order (a pure function of seed and epoch, sliced per rank)
    step.py        the pieces of an optimizer step: fused Adam(W), lr schedule, clipping, fp16 loss scale,
                   the non-finite guard, the EMA
    run_state.py   what a checkpoint holds (parts, RNG, data position) and the resume that reverses it
    meters.py      metric means over a logging interval; throughput, FLOPs and MFU
    loop.py        the loop around a trainer's step: resume, log, images, checkpoint, stop
    preemption.py  SIGTERM / SIGINT turned into a checkpoint at the next step, then `TrainingInterrupted`
"""
