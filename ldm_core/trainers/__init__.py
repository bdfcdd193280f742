"""Training loops. Each stage has one entry point (`train_autoencoder`, `train_ldm`) that shares the machinery
in `ldm_core.trainers.common`: device and precision, deterministic resumable batching, EMA, the non-finite guard,
learning-rate schedules and checkpoint state."""
