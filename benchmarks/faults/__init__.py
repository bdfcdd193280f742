"""The fault campaign: kill, corrupt, starve and misconfigure the pipeline, and check that it survives every time.

    python -m benchmarks.faults [--trials 10] [--seed 0] [--quick] [--only kills,storage,...]
                                [--json benchmarks/results/faults.json] [--workdir DIR]

Sections (each row of the table is one kind of fault; "faults" counts the faults that actually hit, "survived"
those after which the outcome was exactly the right one):

1. kills: each job (train_autoencoder, train_ldm, encode_dataset, ingest) in a subprocess, SIGKILLed at moments
   drawn uniformly over its working window (1 or 2 kills per trial), resumed by rerunning the same command, compared
   with an uninterrupted run: trainers bit for bit (whole checkpoint state + exported weights), the latent store and
   the dataset row for row (`campaign.py`).
2. dagster: `dagster job execute -j ldm_training_job` killed during vae_model training, and during ldm_model
   training, then rerun: the rerun resumes from the checkpoint (resumed_from > 0; for ldm_model the autoencoder is
   reused and nothing re-encoded), nothing was registered before, and the weights equal an uninterrupted training
   bit for bit (`dagster_trial.py`).
3. atomic writes: a process rewriting an 8 MiB artifact, SIGKILLed mid-write over and over: the artifact is always
   one whole version; the temp files the kills leave are removed by the next writer.
4. corrupt checkpoints: the newest checkpoint truncated, bit-flipped, or without its commit record (and every
   checkpoint corrupt): the trainer falls back with a warning and still ends bit-equal to an uninterrupted run.
5. storage: ingestion, the Zarr latent store and trainer checkpoints on s3:// (moto) behind a proxy that fails
   every 3rd request with one fault kind (500, 503, reset, request lost after it took effect, slow) and then all
   mixed at every 2nd: the work completes equal to a fault-free local run. Permanent errors (403, NoSuchBucket,
   resets, 503 forever): the error names the URL, earlier writes stay intact, and the work completes once healed.
6. numerical: isolated NaN batches are skipped and counted (the count checked against the sampler's own order);
   data that turns NaN for good stops the run with the last good checkpoint intact and resumable.
7. configs: every bad field of `bad_configs.py` fails validation naming its field; `ldm demo` and a
   `dagster job execute` with a bad config fail before any work.
8. adversarial: a corpus built to hurt the ingestion (paths out of the source towards a planted secret, /dev/zero,
   a FIFO, an image over the byte limit, a decompression bomb, non-image bytes, lone surrogates, invalid UTF-8, NUL
   bytes, a CSV field over 128 KiB, hostile JSON lines, corrupt Parquet) ingested locally and from s3:// with inline
   credentials, twice: every bad row counted under its reason, good rows kept, the secret never read, the rerun
   reads nothing (`adversarial.py`).
9. preemption: SIGTERM to the vae_model step of `dagster job execute` at random moments (half the kill trials per
   case), on 1 process and on 2 under torchrun: a checkpoint is committed within the grace period (the latency from
   the signal is reported), the step is retried on `TrainingInterrupted`, the retry resumes from that checkpoint and
   the registered weights equal an uninterrupted run's bit for bit; and SIGKILL to the step process alone while 2
   ranks train leaves no rank or torchrun agent alive (`preemption.py`).
10. writers: two runs ingesting two sources into one dataset and encoding it into one store, the second started
    inside the first's commit window; and a zombie writer (SIGSTOPped between writing a shard and recording it, past
    its lease, resumed once a second run took over): both runs succeed, the zombie's commit is refused, every
    recorded row exists exactly once and the manifests name only existing shards (`writers.py`; local disk,
    ``--trials``/2 times each).
11. bitrot: a dataset shard or a latent store shard (Zarr, Parquet) flipped, truncated, replaced by another valid
    file, or (Zarr) missing a file after it was written: every reader refuses it naming the shard; a clean copy
    reads whole; and the check's cost on the first load of an SD-like store (`bitrot.py`).
12. rank loss: rank 1 of a 2-process training SIGKILLed (1 node × 2 processes, and 2 loopback nodes × 1 process in
    one c10d rendezvous) or SIGSTOPped (hung, its connections open) after a random checkpoint: rank 0 fails within
    the collective timeout the spec gives every rank (30 s; 10 s for the hang, which only the timeout ends), every
    torchrun agent exits with a failure, and the rerun resumes from the newest complete checkpoint and trains to
    the end (`rank_loss.py`, ``--trials``/2 times each).

The machinery is shared with the test suite (tests/faults runs one or two trials of each):

    campaign.py       kill a job in a subprocess at random moments, resume it, compare with an uninterrupted run
    runner.py         the jobs the campaign kills (``python -m benchmarks.faults.runner``) and their tiny configs
    dagster_trial.py  the same for ``dagster job execute`` on a fresh Dagster home
    injectors.py      faults injected in process: poisoned data, a failure after a checkpoint, a torn-write loop
    s3proxy.py        an S3 proxy in front of moto that fails requests by policy
    bad_configs.py    one wrong field each, with the field path its error must name
    adversarial.py    the adversarial input corpus and its expected counts
    kills.py … rank_loss.py the campaign's sections; table.py its rows; __main__.py the command
"""
