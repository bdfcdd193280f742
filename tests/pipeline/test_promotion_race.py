"""Two gates at once on a real MLflow registry (SQLite): both candidates pass against the old champion, one is better.
Whatever the order in which they reach the alias, the better one ends up champion and the alias never moves to a
candidate that the champion of the moment beats.

Each gate runs the calls the `evaluation_report` asset makes, in its order: `read_champion_for_gate`, the gate's
decision against that champion (the minutes of evaluation are what the race needs, not what is measured), the
candidate's metrics recorded on it, then `promote`. The module's test seams hold the two gates at a barrier.
"""

import json
import threading

import pytest
from mlflow.tracking import MlflowClient

from ldm_core.evaluation.gate import GateConfig, MetricRule, decide
from pipeline import promotion
from pipeline.promotion import METRICS_TAG, promote, read_champion_for_gate
from pipeline.promotion_lock import storage_lock

GATE = GateConfig(rules={"color_acc": MetricRule(higher_is_better=True, tolerance=0.02)})
OLD, BETTER, WORSE = 0.5, 0.9, 0.7  # both candidates pass against the old champion; the better beats the worse
WAIT = 30.0


def _metrics(value: float) -> dict:
    return {"color_acc": {"name": "color_acc", "value": value, "n": 100, "computed": True}}


@pytest.fixture(scope="module")
def registry_uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"


@pytest.fixture
def registry(registry_uri, request, tmp_path):
    """A registered model (named for the test) with champion v1 and candidates v2 (better) and v3 (worse)."""
    client = MlflowClient(tracking_uri=registry_uri, registry_uri=registry_uri)
    name = "ldm-" + request.node.name.replace("[", "-").replace("]", "").replace("_", "-")[-60:]
    client.create_registered_model(name)
    versions = {}
    for label in ("old", "better", "worse"):
        mv = client.create_model_version(name, source=str(tmp_path), tags={"label": label})
        versions[label] = str(mv.version)
    client.set_model_version_tag(name, versions["old"], METRICS_TAG, json.dumps(_metrics(OLD)))
    client.set_registered_model_alias(name, "champion", versions["old"])
    return client, name, versions


@pytest.fixture
def alias_history(monkeypatch):
    """Every version alias `champion` was moved to, in order."""
    history: list[str] = []
    real = MlflowClient.set_registered_model_alias

    def recording(client, name, alias, version):
        real(client, name, alias, version)
        if alias == "champion":
            history.append(str(version))

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", recording)
    return history


def _gate(registry_uri: str, name: str, version: str, value: float, root: str) -> promotion.Promotion:
    """One evaluation_report's gate, in its own client (as its own process would have)."""
    client = MlflowClient(tracking_uri=registry_uri, registry_uri=registry_uri)
    champion = read_champion_for_gate(client, name)
    decision = decide(_metrics(value), champion.metrics, GATE)
    client.set_model_version_tag(name, version, METRICS_TAG, json.dumps(_metrics(value)))
    return promote(
        client,
        name,
        version,
        _metrics(value),
        judged_against=champion,
        decision=decision,
        gate=GATE,
        lock=storage_lock(root, f"promotion-{name}"),
        measure=lambda v: pytest.fail(f"v{v} has recorded metrics: nothing to measure again"),
    )


def _start(registry_uri, name, versions, root, results, done):
    threads = {}
    for label, value in (("better", BETTER), ("worse", WORSE)):

        def run(label=label, value=value):
            try:
                results[label] = _gate(registry_uri, name, versions[label], value, root)
            finally:
                done[label].set()

        threads[label] = threading.Thread(target=run, name=label)
        threads[label].start()
    return threads


@pytest.mark.parametrize("first", ["better", "worse"])
def test_both_read_the_old_champion_then_promote_in_turn(
    registry, registry_uri, alias_history, monkeypatch, tmp_path, first
):
    """Both gates judge their candidate against the old champion, then reach the alias one after the other: the
    second finds a new champion and must judge its candidate again against it."""
    client, name, versions = registry
    second = "worse" if first == "better" else "better"
    read, go = threading.Barrier(3), {k: threading.Event() for k in ("better", "worse")}
    done = {k: threading.Event() for k in ("better", "worse")}

    def hold(champion):
        assert champion.version == versions["old"]
        read.wait(WAIT)
        assert go[threading.current_thread().name].wait(WAIT)

    monkeypatch.setattr(promotion, "after_champion_read", hold)
    results: dict[str, promotion.Promotion] = {}
    threads = _start(registry_uri, name, versions, str(tmp_path / "root"), results, done)
    read.wait(WAIT)  # both have read the old champion
    for label in (first, second):
        go[label].set()
        assert done[label].wait(WAIT)
    for t in threads.values():
        t.join(WAIT)

    assert str(client.get_model_version_by_alias(name, "champion").version) == versions["better"]
    # never backwards: after the better one, the alias never moved to the worse one
    assert alias_history == ([versions["better"]] if first == "better" else [versions["worse"], versions["better"]])
    assert results[first].describe() == "promoted"
    if second == "worse":
        assert results["worse"].describe() == f"kept_champion (re-compared with v{versions['better']})"
    else:
        assert results["better"].describe() == f"promoted (re-compared with v{versions['worse']})"
        assert results["better"].compared_with == [f"v{versions['old']}", f"v{versions['worse']}"]


@pytest.mark.parametrize("storage", ["local", "s3"])
def test_the_re_read_and_the_move_are_one_step_across_gates(
    registry, registry_uri, alias_history, monkeypatch, tmp_path, storage, request
):
    """Both gates reach `promote` at once. Without the lock both would re-read the old champion and both move the
    alias (here: the better one first, then the worse one over it); with it the second re-reads after the first
    moved the alias."""
    client, name, versions = registry
    root = request.getfixturevalue("s3_url") if storage == "s3" else str(tmp_path / "root")
    read = threading.Barrier(2)
    done = {k: threading.Event() for k in ("better", "worse")}

    def both_read(champion):
        read.wait(WAIT)

    def worse_waits_for_better(champion):
        # inside the critical section: the worse gate waits (a while) for the better one to finish. Holding the lock,
        # it waits in vain and goes on; without it, the better one moves the alias meanwhile and the worse one
        # then moves it on the strength of its stale re-read
        if threading.current_thread().name == "worse":
            done["better"].wait(2.0)

    monkeypatch.setattr(promotion, "after_champion_read", both_read)
    monkeypatch.setattr(promotion, "after_champion_reread", worse_waits_for_better)
    results: dict[str, promotion.Promotion] = {}
    for t in _start(registry_uri, name, versions, root, results, done).values():
        t.join(WAIT)

    assert set(results) == {"better", "worse"}
    assert str(client.get_model_version_by_alias(name, "champion").version) == versions["better"]
    assert alias_history[-1] == versions["better"] and alias_history in (
        [versions["better"]],
        [versions["worse"], versions["better"]],
    )


def test_a_new_champion_without_recorded_metrics_is_measured_before_the_move(
    registry, registry_uri, alias_history, monkeypatch, tmp_path
):
    """Between the gate's read and its move, the alias was put by hand on a version with no recorded metrics: the
    gate measures it (outside the lock) and judges its candidate against it, never on thresholds alone."""
    client, name, versions = registry
    measured = []

    def promoted_by_hand(champion):
        client.set_registered_model_alias(name, "champion", versions["better"])

    def measure(version):
        measured.append(version)
        client.set_model_version_tag(name, version, METRICS_TAG, json.dumps(_metrics(BETTER)))
        return _metrics(BETTER)

    monkeypatch.setattr(promotion, "after_champion_read", promoted_by_hand)
    champion = read_champion_for_gate(client, name)
    result = promote(
        client,
        name,
        versions["worse"],
        _metrics(WORSE),
        judged_against=champion,
        decision=decide(_metrics(WORSE), champion.metrics, GATE),
        gate=GATE,
        lock=storage_lock(str(tmp_path / "root"), f"promotion-{name}"),
        measure=measure,
    )
    assert measured == [versions["better"]]
    assert result.describe() == f"kept_champion (re-compared with v{versions['better']})"
    assert str(client.get_model_version_by_alias(name, "champion").version) == versions["better"]
    assert alias_history == [versions["better"]]  # the hand's move only
