"""Training on several processes from Dagster: ``torchrun`` launched through Dagster Pipes.

    specs.py      a stage's training spec as plain data (JSON): what the asset hands to the trainer's processes
    launch.py     `train(context, compute, spec, tracker)`: in-process for one process, torchrun + Pipes for more;
                  a SIGTERM to the step is forwarded to torchrun, which checkpoints and stops within a grace
    entry.py      what every torchrun rank runs: join the process group, train, rank 0 reports back
    lifetime.py   torchrun and its ranks die with the step process (parent-death signals, the race checked)
    train_vae.py  ``python -m pipeline.distributed.train_vae spec.json`` (under torchrun)
    train_ldm.py  ``python -m pipeline.distributed.train_ldm spec.json`` (under torchrun)

On Kubernetes the same entry points run in a pod of their own through dagster-k8s' ``PipesK8sClient``
(see deploy/README.md).
"""
