"""The README's benchmark blocks, rendered from the JSON committed under benchmarks/results/.

    python -m benchmarks.readme            # rewrite every generated block of README.md from its JSON
    python -m benchmarks.readme --check    # exit 1 with a diff when README.md differs from what the JSON renders

A generated block of README.md sits between two markers, and nothing between them is typed by hand:

    <!-- benchmarks.readme: NAME -->
    ...what BLOCKS[NAME] renders from its JSON...
    <!-- /benchmarks.readme -->

`BLOCKS` maps each NAME to its JSON (under benchmarks/results/), its render function and the command that measures
it. --check also reports a missing JSON, a block of BLOCKS with no marker in the README, an unknown NAME and a block
opened and never closed (tests/benchmarks/test_readme_blocks.py runs it on the repository's README).
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN = re.compile(r"^<!-- benchmarks\.readme: ([\w.-]+) -->$")
END = "<!-- /benchmarks.readme -->"


@dataclass(frozen=True)
class Block:
    json: str  # relative to the repository root
    render: Callable[[dict], str]
    command: str  # what writes the JSON


def _suite(doc: dict) -> str:
    from benchmarks.table import render

    return render(doc)


def _suite_model_rows(doc: dict) -> str:
    from benchmarks.table import render

    return render(doc, model_rows_only=True)


def _end_to_end(doc: dict) -> str:
    from benchmarks.end_to_end import render

    return render(doc)


def _lora(doc: dict) -> str:
    from benchmarks.lora import render

    return render(doc)


def _fsdp(doc: dict) -> str:
    from benchmarks.fsdp import markdown

    return markdown(doc)


BLOCKS: dict[str, Block] = {
    "suite-fp32": Block(
        "benchmarks/results/suite-fp32.json", _suite, "python -m benchmarks --json benchmarks/results/suite-fp32.json"
    ),
    "suite-bf16": Block(
        "benchmarks/results/suite-bf16.json",
        _suite_model_rows,
        "python -m benchmarks --precision bf16 --json benchmarks/results/suite-bf16.json",
    ),
    "end-to-end": Block(
        "benchmarks/results/end_to_end.json",
        _end_to_end,
        "python -m benchmarks.end_to_end --json benchmarks/results/end_to_end.json",
    ),
    "lora": Block("benchmarks/results/lora.json", _lora, "python -m benchmarks.lora"),
    "fsdp": Block("benchmarks/results/fsdp.json", _fsdp, "python -m benchmarks.fsdp"),
}


def _spans(lines: list[str], problems: list[str]) -> list[tuple[str, int, int]]:
    """(name, line of the begin marker, line of the end marker) of each well-formed block; malformed ones are
    described in ``problems``."""
    spans, open_at, name = [], None, ""
    for i, line in enumerate(lines):
        begin = BEGIN.match(line.strip())
        if begin:
            if open_at is not None:
                problems.append(f"block {name!r} (line {open_at + 1}) is not closed before {line.strip()!r}")
            open_at, name = i, begin.group(1)
        elif line.strip() == END:
            if open_at is None:
                problems.append(f"line {i + 1}: {END} closes no block")
            else:
                spans.append((name, open_at, i))
            open_at = None
    if open_at is not None:
        problems.append(f"block {name!r} (line {open_at + 1}) is never closed with {END}")
    return spans


def render_blocks(text: str, root: Path = ROOT, blocks: dict[str, Block] = BLOCKS) -> tuple[str, list[str]]:
    """``text`` (a README) with every block re-rendered from its JSON under ``root``, and the problems found (a
    block whose JSON is missing keeps its old content)."""
    lines, problems = text.split("\n"), []
    spans = _spans(lines, problems)
    seen = [name for name, _, _ in spans]
    for name in blocks:
        if name not in seen:
            problems.append(f"block {name!r} is missing from the README (no '<!-- benchmarks.readme: {name} -->')")
    for name in sorted({n for n in seen if seen.count(n) > 1}):
        problems.append(f"block {name!r} appears {seen.count(name)} times")
    for name, begin, end in reversed(spans):  # from the end: earlier line numbers stay valid
        block = blocks.get(name)
        if block is None:
            problems.append(f"line {begin + 1}: unknown block {name!r} (known: {', '.join(blocks)})")
            continue
        path = root / block.json
        if not path.is_file():
            problems.append(f"block {name!r}: {block.json} is missing (measure it: {block.command})")
            continue
        lines[begin + 1 : end] = block.render(json.loads(path.read_text())).split("\n")
    return "\n".join(lines), problems


def check(readme: Path, root: Path = ROOT, blocks: dict[str, Block] = BLOCKS) -> list[str]:
    """What is wrong with ``readme`` against the JSON under ``root``: the problems, then a unified diff of the
    blocks as they are against what the JSON renders; empty when the README matches."""
    text = readme.read_text()
    rendered, problems = render_blocks(text, root, blocks)
    diff = difflib.unified_diff(
        text.splitlines(), rendered.splitlines(), f"{readme} (as it is)", f"{readme} (rendered)", lineterm=""
    )
    return problems + list(diff)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 and print a diff on any difference")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    p.add_argument("--root", type=Path, default=ROOT, help="where the JSON paths of BLOCKS start")
    a = p.parse_args(argv)
    if a.check:
        report = check(a.readme, a.root)
        print("\n".join(report) if report else f"{a.readme}: every block matches its JSON")
        return 1 if report else 0
    rendered, problems = render_blocks(a.readme.read_text(), a.root)
    a.readme.write_text(rendered)
    print("\n".join(problems) if problems else f"{a.readme}: every block rendered from its JSON")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
