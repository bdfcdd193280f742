"""Moving alias `champion`: a compare-and-swap, so that gates running at once never move it backwards.

A gate reads the champion, evaluates its candidate for minutes, then promotes. Meanwhile another gate may have
promoted its own candidate. Setting the alias on the strength of the first read alone could put it on a candidate the
new champion beats, or on an older version that was never compared with the new champion. So `promote`, holding the
storage root's promotion lock (`pipeline.promotion_lock`: MLflow aliases have no compare-and-swap of their own):

1) re-reads the champion;
2) if it is still the one the candidate was judged against, moves the alias;
3) if it changed, judges the candidate again against the new champion, on the metrics the new champion's own gate
   recorded on it (``evaluation_metrics``), and moves the alias only if the candidate passes. A champion without
   recorded metrics (promoted by hand) is measured again outside the lock (minutes), and the round starts over.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ldm_core.evaluation.gate import GateConfig, GateDecision, decide
from pipeline.promotion_lock import Lock, held
from pipeline.registry import version_by_alias

CHAMPION = "champion"
METRICS_TAG = "evaluation_metrics"  # on a registered version: its metrics.json "metrics", for the next gate
MAX_ROUNDS = 5
"""Champions without recorded metrics measured again before giving up (the champion keeps changing under us)."""

# Test seams, None in production: called with the champion a gate has just read, first (before its evaluation) and
# again under the promotion lock. Tests hold two gates at a barrier here to make them race deterministically.
after_champion_read: Callable[[Champion], None] | None = None
after_champion_reread: Callable[[Champion], None] | None = None

Outcome = Literal["promoted", "kept_champion", "gate_failed"]


@dataclass(frozen=True)
class Champion:
    """The version alias `champion` names (None: there is none yet) and the metrics its gate recorded on it."""

    version: str | None
    metrics: dict[str, Any] | None = None

    @property
    def label(self) -> str:
        return f"v{self.version}" if self.version is not None else "none"


@dataclass(frozen=True)
class Promotion:
    """What the gate did with the alias, and against which champions it judged the candidate, in order."""

    outcome: Outcome
    champion_after: str | None
    decision: GateDecision
    """The decision that counted: against the last champion compared with."""
    compared_with: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line: "promoted", "kept_champion (re-compared with v7)", ..."""
        again = self.compared_with[1:]
        return self.outcome + (f" (re-compared with {', '.join(again)})" if again else "")


def read_champion(client: Any, name: str) -> Champion:
    """The champion now; a registry error raises (the gate never reads "could not ask" as "none")."""
    mv = version_by_alias(client, name, CHAMPION)
    if mv is None:
        return Champion(None)
    tag = mv.tags.get(METRICS_TAG)
    return Champion(str(mv.version), json.loads(tag) if tag else None)


def read_champion_for_gate(client: Any, name: str) -> Champion:
    """The gate's first read of the champion (what its candidate is evaluated against)."""
    champion = read_champion(client, name)
    if after_champion_read is not None:
        after_champion_read(champion)
    return champion


def promote(
    client: Any,
    name: str,
    candidate: str,
    candidate_metrics: Mapping[str, Any],
    judged_against: Champion,
    decision: GateDecision,
    gate: GateConfig,
    lock: Lock,
    measure: Callable[[str], dict[str, Any]],
) -> Promotion:
    """Move `champion` to ``candidate`` if it passed against the champion that holds the alias at the moment of the
    move (see the module's docstring). ``measure(version)`` measures a champion without recorded metrics exactly as
    the candidate was measured, and records them on it."""
    compared = [judged_against.label]
    for _ in range(MAX_ROUNDS):
        if not decision.passed:
            outcome: Outcome = "gate_failed" if len(compared) == 1 else "kept_champion"
            return Promotion(outcome, judged_against.version, decision, compared)
        with held(lock):
            current = read_champion(client, name)
            if after_champion_reread is not None:
                after_champion_reread(current)
            if current.version == candidate:  # a retried step whose first attempt got as far as the move
                return Promotion("promoted", candidate, decision, compared)
            # a new champion with recorded metrics, or none at all any more (the alias was removed): judge again
            if current.version != judged_against.version and (current.metrics is not None or current.version is None):
                judged_against = current
                compared.append(current.label)
                decision = decide(candidate_metrics, current.metrics, gate)
                if not decision.passed:
                    return Promotion("kept_champion", current.version, decision, compared)
            if current.version == judged_against.version:
                lock.check_held()
                client.set_registered_model_alias(name, CHAMPION, candidate)
                return Promotion("promoted", candidate, decision, compared)
        # the new champion has no recorded metrics: measure it (minutes, so not under the lock), then try again
        judged_against = Champion(current.version, measure(str(current.version)))
        compared.append(judged_against.label)
        decision = decide(candidate_metrics, judged_against.metrics, gate)
    raise RuntimeError(f"{name}@{CHAMPION} changed {MAX_ROUNDS} times while this gate measured it; try again")


__all__ = ["CHAMPION", "METRICS_TAG", "Champion", "Promotion", "promote", "read_champion", "read_champion_for_gate"]
