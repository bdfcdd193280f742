"""Training on several processes from Dagster: ``torchrun`` launched through Dagster Pipes.

    specs.py      a stage's training spec as plain data (JSON): what the asset hands to the trainer's processes
    launch.py     `train(context, compute, spec, tracker)`: in-process for one process, torchrun + Pipes for more
                  (one agent per node; several nodes on loopback, or on Kubernetes through k8s.py);
                  a SIGTERM to the step is forwarded to torchrun, which checkpoints and stops within a grace
    torchrun.py   the torchrun command line of one node: standalone, or an agent of a c10d rendezvous
    k8s.py        an M-node training on Kubernetes: an indexed Job, a headless Service, the spec in a ConfigMap
    entry.py      what every torchrun rank runs: join the process group, train, rank 0 reports back
    lifetime.py   torchrun and its ranks die with the step process (parent-death signals, the race checked)
    train_vae.py  ``python -m pipeline.distributed.train_vae spec.json`` (under torchrun)
    train_ldm.py  ``python -m pipeline.distributed.train_ldm spec.json`` (under torchrun)

On Kubernetes the same entry points run in the pods of an indexed Job, rank 0's Pipes messages read from pod 0's log
(``compute.launcher: k8s``; see deploy/README.md).
"""
