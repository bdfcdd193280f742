"""The compute resource's scale fields: strategy reaches both trainers' configs, nodes and the collective timeout
reach the launch, and a wrong value fails the step for good (not retried) with the field's name."""

import dagster as dg
import pytest

from ldm_core.trainers.autoencoder import AutoencoderTrainerConfig
from ldm_core.trainers.ldm import LDMTrainerConfig
from pipeline.distributed import launch
from pipeline.distributed.specs import VaeTrainSpec, read_spec
from pipeline.resources import COLLECTIVE_TIMEOUT_S, ComputeResource


@pytest.mark.parametrize("trainer", [AutoencoderTrainerConfig, LDMTrainerConfig])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_the_strategy_reaches_both_trainers(trainer, strategy):
    assert ComputeResource(strategy=strategy).apply(trainer()).strategy == strategy
    # "auto" (the default) leaves what the run config's trainer section chose
    assert ComputeResource().apply(trainer(strategy=strategy)).strategy == strategy
    assert ComputeResource().apply(trainer()).strategy == "auto"


@pytest.mark.parametrize(
    "fields,call,message",
    [
        ({"strategy": "zero3"}, "apply", "compute.strategy must be one of ['auto', 'ddp', 'fsdp'], got 'zero3'"),
        ({"nodes": 0}, "node_count", "compute.nodes must be an integer >= 1, got 0"),
        ({"collective_timeout_s": 0}, "node_count", "compute.collective_timeout_s must be > 0"),
        ({"launcher": "slurm"}, "node_count", "compute.launcher must be one of ['local', 'k8s']"),
        ({"launcher": "k8s"}, "node_count", "compute.launcher k8s needs compute.k8s_image"),
        ({"launcher": "k8s", "num_processes": "auto"}, "process_count", "must be a number with launcher k8s"),
    ],
)
def test_a_wrong_value_fails_for_good_naming_the_field(fields, call, message):
    compute = ComputeResource(**fields)
    with pytest.raises(dg.Failure) as e:
        compute.apply(LDMTrainerConfig()) if call == "apply" else getattr(compute, call)()
    assert message in e.value.description and e.value.allow_retries is False


def test_nodes_count_the_processes_per_node_and_the_timeout_travels_in_the_spec(tmp_path):
    compute = ComputeResource(num_processes=2, nodes=3, collective_timeout_s=45, launcher="k8s", k8s_image="i:1")
    assert (compute.process_count(), compute.node_count()) == (2, 3)  # k8s: the pods' GPUs, not this machine's
    spec = VaeTrainSpec(
        training={"trainer": {"device": "cuda:1"}},
        dataset_url="d",
        resolution=16,
        checkpoint_dir="c",
        output_url="o",
    )
    assert spec.collective_timeout_s is None  # in-process: no process group, no timeout
    ranks = launch._for_processes(spec, compute)
    assert ranks.collective_timeout_s == 45 and ranks.training["trainer"]["device"] == "cuda"
    assert launch._for_processes(spec, ComputeResource()).collective_timeout_s == COLLECTIVE_TIMEOUT_S
    # what every rank reads back from the spec file
    path = tmp_path / "spec.json"
    ranks.to_json_file(path)
    assert read_spec(path).collective_timeout_s == 45
