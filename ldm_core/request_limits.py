"""The bounds of one text-to-image request — a call of the served `ldm` model (its pyfunc) or `ldm sample` — so that
no request, by mistake or on purpose, ties a server up for hours or exhausts its memory.

Each request is a table of rows (one image per row): ``prompt``, and optionally ``seed``, ``steps``, ``guidance``.
A request beyond a bound is refused whole, before any sampling, with one line naming the field, the value and the
bound. The image size is the model's own (its latent shape), not a request field, so it has no bound here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

MAX_ROWS = 64
"""Rows (images) per request: 1..MAX_ROWS. Each row is a full sampling run; more is a batch job, not a request."""
MAX_STEPS = 1000
"""Sampler steps per image: 1..MAX_STEPS (the DDPM training chain's length; samplers need far fewer)."""
MAX_GUIDANCE = 50.0
"""Classifier-free guidance scale: finite, 0..MAX_GUIDANCE (useful scales are ~1-15; beyond 50 is saturation)."""
MAX_SEED = 2**63 - 1
"""Seeds: integers 0..MAX_SEED (the signature's ``long``; torch seeds its generator with any of them)."""
MAX_PROMPT_CHARS = 10_000
"""Characters per prompt (the text encoder keeps its first tokens only; a longer text is only a cost)."""


class RequestRefused(ValueError):
    """A request beyond one of the bounds; the message is one line naming the field."""


def _plain(value: object) -> object:
    """A numpy scalar (what a DataFrame cell holds) as the Python number it is."""
    item = getattr(value, "item", None)
    return item() if callable(item) and getattr(value, "shape", None) == () else value


def _integer(field: str, value: object, low: int, high: int) -> int:
    value = _plain(value)
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(value, float) and not value.is_integer())
    ):
        raise RequestRefused(f"{field} must be an integer in {low}..{high}, got {value!r}")
    if not low <= value <= high:
        raise RequestRefused(f"{field} must be in {low}..{high}, got {int(value)}")
    return int(value)


def check_rows(n: int) -> None:
    """A request of ``n`` rows is within 1..`MAX_ROWS`."""
    if not 1 <= n <= MAX_ROWS:
        raise RequestRefused(f"a request has 1..{MAX_ROWS} rows (one image each), got {n}")


def check_request(
    prompts: Sequence[object],
    seeds: Sequence[object | None],
    steps: Sequence[object | None],
    guidance: Sequence[float | None],
) -> tuple[list[int | None], list[int | None], list[float | None]]:
    """Check every row (None: the model's default) against the bounds; return seeds, steps and guidance typed."""
    check_rows(len(prompts))
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise RequestRefused(f"prompt of row {i} must be a string, got {type(p).__name__}")
        if len(p) > MAX_PROMPT_CHARS:
            raise RequestRefused(f"prompt of row {i} has {len(p)} characters; at most {MAX_PROMPT_CHARS}")
    out_seeds = [None if s is None else _integer(f"seed of row {i}", s, 0, MAX_SEED) for i, s in enumerate(seeds)]
    out_steps = [None if s is None else _integer(f"steps of row {i}", s, 1, MAX_STEPS) for i, s in enumerate(steps)]
    out_guid: list[float | None] = []
    for i, g in enumerate(guidance):
        g = _plain(g)
        if g is not None and (
            isinstance(g, bool)
            or not isinstance(g, (int, float))
            or not math.isfinite(g)
            or not 0.0 <= g <= MAX_GUIDANCE
        ):
            raise RequestRefused(f"guidance of row {i} must be a finite number in 0..{MAX_GUIDANCE:g}, got {g!r}")
        out_guid.append(None if g is None else float(g))
    return out_seeds, out_steps, out_guid
