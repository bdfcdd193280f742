"""One row of the fault campaign's table: a kind of fault, how often it hit, how often the outcome was exact."""

from __future__ import annotations

from typing import Any

Row = dict[str, Any]

JOB_NAMES = {"ae": "train_autoencoder", "ldm": "train_ldm", "encode": "encode_dataset", "ingest": "ingest"}


def row(
    category: str, case: str, trials: int, faults: int, survived: int, result: str, seconds: float, notes: str = ""
) -> Row:
    return {
        "category": category,
        "case": case,
        "trials": trials,
        "faults": faults,
        "survived": survived,
        "result": result,
        "seconds": round(seconds, 1),
        "notes": notes,
    }
