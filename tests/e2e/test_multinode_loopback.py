"""Two nodes on loopback train exactly what one node with as many processes trains.

`compute.nodes: 2` without Kubernetes starts two torchrun agents on this machine that meet in a c10d rendezvous
(`pipeline.distributed.launch.local_node_commands`): the multi-node code path, standing in for two machines. The
tiny LDM is trained through the launcher, inside a Dagster run, as 2 nodes × 1 process and as 1 node × 2 processes,
same seed and spec, under DDP and under FSDP2: the same global ranks see the same rows and draws and reduce the
same gradients, so the weights must be bit-for-bit equal.
"""

from pathlib import Path

import dagster as dg
import pytest
import torch

from benchmarks.faults import rank_loss, runner
from ldm_core.data.latent_store.schema import read_metadata
from ldm_core.tracking import NullTracker
from pipeline.distributed import launch
from pipeline.distributed.specs import LdmTrainSpec
from pipeline.resources import ComputeResource

STEPS = 4


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A latent store of the campaign's shapes dataset, encoded with the campaign's tiny VAE, and that VAE saved."""
    root = tmp_path_factory.mktemp("loopback")
    made = rank_loss.ldm_inputs(root)
    return root, made["vae"], made["store"]


def _spec(inputs, name: str, compute: ComputeResource) -> LdmTrainSpec:
    """ldm_model's spec as the asset builds it: the compute resource applied to the trainer config."""
    root, vae_url, store_url = inputs
    meta = read_metadata(store_url)
    training = runner.ldm_config(STEPS)
    training.denoiser.context_dim = meta.context_shape[1]
    training.trainer.checkpoint_every = STEPS
    training.trainer = compute.apply(training.trainer)
    return LdmTrainSpec(
        training=training.to_dict(),
        store_url=store_url,
        vae_url=vae_url,
        text_encoder=rank_loss.TEXT_ENCODER.to_dict(),
        latent_shape=list(meta.latent_shape),
        guidance=1.0,
        validation_prompts=["a red square"],
        validation_seeds=1,
        checkpoint_dir=str(root / name / "ckpt"),
        output_url=str(root / name / "out"),
    )


def _train(spec: LdmTrainSpec, compute: ComputeResource) -> tuple[dict[str, torch.Tensor], dict]:
    """``launch.train`` in a Dagster run's asset, as the GPU assets call it: (trained weights, its metadata)."""
    weights: dict[str, torch.Tensor] = {}

    @dg.asset
    def trained(context: dg.AssetExecutionContext, compute: ComputeResource) -> dg.MaterializeResult:
        result, metadata = launch.train(context, compute, spec, NullTracker())
        weights.update(result.model.state_dict())
        return dg.MaterializeResult(metadata=metadata)

    out = dg.materialize([trained], resources={"compute": compute})
    assert out.success
    (mat,) = out.asset_materializations_for_node("trained")
    return weights, {k: getattr(v, "value", v) for k, v in mat.metadata.items()}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_nodes_on_loopback_train_what_one_node_of_two_processes_trains(inputs, strategy):
    computes = {
        "1x2": ComputeResource(num_processes=2, nodes=1, strategy=strategy, threads=1),
        "2x1": ComputeResource(num_processes=1, nodes=2, strategy=strategy, threads=1),
    }
    specs = {layout: _spec(inputs, f"{strategy}-{layout}", compute) for layout, compute in computes.items()}
    one_node, md1 = _train(specs["1x2"], computes["1x2"])
    two_nodes, md2 = _train(specs["2x1"], computes["2x1"])
    for spec in specs.values():  # the strategy reached the trainer: under fsdp each rank wrote its own shards (DCP)
        shard_files = {p.name.split("_")[2] for p in Path(spec.checkpoint_dir).glob("step-*.dcp/__*_*.distcp")}
        assert shard_files == ({"0", "1"} if strategy == "fsdp" else set()), (strategy, shard_files)
    # both ran 2 ranks of one process group, under torchrun; the second through two agents
    assert (md1["world_size"], md1["nodes"], md1["launcher"]) == (2, 1, "torchrun")
    assert (md2["world_size"], md2["nodes"], md2["launcher"]) == (2, 2, "torchrun")
    assert md1["trained_steps"] == md2["trained_steps"] == STEPS
    assert one_node.keys() == two_nodes.keys() and one_node
    differing = [k for k in one_node if not torch.equal(one_node[k], two_nodes[k])]
    assert differing == [], f"{len(differing)} of {len(one_node)} tensors differ, e.g. {differing[:3]}"


def test_the_node_commands_form_one_rendezvous_with_node_zero_hosting_it():
    """The agents' command lines: one rendezvous (endpoint, id), node 0 hosts the store and sorts first."""
    single = launch.local_node_commands("ldm", 2, 1, "spec.json", 30)
    assert len(single) == 1 and "--standalone" in single[0] and "--nproc-per-node=2" in single[0]
    nodes = launch.local_node_commands("ldm", 4, 3, "spec.json", 30)
    assert len(nodes) == 3 and not any("--standalone" in c for c in nodes)

    def opt(command: list[str], name: str) -> str:
        (value,) = [a.split("=", 1)[1] for a in command if a.startswith(f"--{name}=")]
        return value

    assert {opt(c, "rdzv-endpoint") for c in nodes} == {opt(nodes[0], "rdzv-endpoint")}
    assert len({opt(c, "rdzv-id") for c in nodes}) == 1
    assert [opt(c, "nnodes") for c in nodes] == ["3"] * 3 and [opt(c, "nproc-per-node") for c in nodes] == ["4"] * 3
    assert [opt(c, "rdzv-conf") for c in nodes] == ["is_host=1", "is_host=0", "is_host=0"]
    addrs = [opt(c, "local-addr") for c in nodes]
    assert addrs == sorted(addrs) and len(set(addrs)) == 3  # torch orders the nodes' ranks by address
    assert opt(nodes[0], "rdzv-endpoint").split(":")[0] == addrs[0]
    # a later launch never joins this one
    assert opt(launch.local_node_commands("ldm", 4, 3, "spec.json", 30)[0], "rdzv-id") != opt(nodes[0], "rdzv-id")
