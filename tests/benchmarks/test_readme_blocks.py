"""The README's benchmark tables are rendered from the JSON committed under benchmarks/results/ (issue 25): the
repository's README matches them, and a hand edit, a changed JSON, a removed marker or a missing JSON is caught."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from benchmarks.readme import BLOCKS, ROOT, check, main

BEGIN = "<!-- benchmarks.readme: {} -->"
END = "<!-- /benchmarks.readme -->"


def test_the_readme_matches_the_committed_json():
    # no skip: a missing JSON is a problem check() reports, so this fails
    report = check(ROOT / "README.md")
    assert report == [], "\n".join(report) + "\n(regenerate: python -m benchmarks.readme)"


def test_git_keeps_the_json_of_every_block_and_ignores_scratch():
    paths = [b.json for b in BLOCKS.values()]
    kept = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True, text=True)
    assert kept.stdout == "", f"ignored by .gitignore, so never committed: {kept.stdout}"
    scratch = ["benchmarks/results/lora-quick.json", "benchmarks/results/fsdp-quick.json", "benchmarks/results/x.json"]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *scratch], cwd=ROOT, capture_output=True, text=True)
    assert ignored.stdout.split() == scratch


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A copy of the README and of every block's JSON: the planted defects never touch the repository."""
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    for block in BLOCKS.values():
        (tmp_path / block.json).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / block.json, tmp_path / block.json)
    return tmp_path


def _block_lines(text: str, name: str) -> tuple[int, int]:
    lines = text.split("\n")
    begin = lines.index(BEGIN.format(name))
    return begin, lines.index(END, begin)


@pytest.mark.parametrize("name", list(BLOCKS))
def test_a_figure_edited_by_hand_fails_the_check(repo, name):
    readme = repo / "README.md"
    lines = readme.read_text().split("\n")
    begin, end = _block_lines("\n".join(lines), name)
    row = next(i for i in range(begin + 1, end) if re.search(r"\| \**\d", lines[i]))  # a table row with a figure
    lines[row] = re.sub(r"(\| \**)(\d)", lambda m: m.group(1) + str((int(m.group(2)) + 1) % 10), lines[row], count=1)
    readme.write_text("\n".join(lines))
    report = check(readme, repo)
    assert any(line.startswith("-") and line[1:] == lines[row] for line in report), report
    assert main(["--readme", str(readme), "--root", str(repo)]) == 0  # rendering again puts the JSON's figure back
    assert check(readme, repo) == []


def _scale(doc: dict, path: list) -> None:
    *parents, key = path
    for p in parents:
        doc = doc[p]
    doc[key] *= 2


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("suite-fp32", ["rows", 0, "ours"]),
        ("suite-bf16", ["rows", 0, "ours"]),
        ("lora", ["results", 0, "sides", "ours_lora", "images_per_s"]),
        ("fsdp", ["step_time", "ratio_fsdp_over_ddp"]),
    ],
)
def test_a_changed_json_value_fails_the_check(repo, name, path):
    assert check(repo / "README.md", repo) == []  # the copy matches: what fails below is the changed value
    json_path = repo / BLOCKS[name].json
    doc = json.loads(json_path.read_text())
    _scale(doc, path)
    json_path.write_text(json.dumps(doc))
    report = check(repo / "README.md", repo)
    assert report and all(not line.startswith("block") for line in report)  # a diff, not a structural problem
    assert any(line.startswith("+") for line in report)


def test_a_removed_end_marker_is_reported(repo):
    readme = repo / "README.md"
    text = readme.read_text()
    _, end = _block_lines(text, "lora")
    lines = text.split("\n")
    del lines[end]
    readme.write_text("\n".join(lines))
    assert any("'lora'" in p and "not closed" in p for p in check(readme, repo))


def test_a_removed_begin_marker_is_reported(repo):
    readme = repo / "README.md"
    readme.write_text(readme.read_text().replace(BEGIN.format("fsdp") + "\n", ""))
    report = check(readme, repo)
    assert any("'fsdp' is missing from the README" in p for p in report)
    assert any("closes no block" in p for p in report)


def test_a_missing_json_is_named(repo):
    (repo / BLOCKS["lora"].json).unlink()
    report = check(repo / "README.md", repo)
    assert any(BLOCKS["lora"].json in p and "missing" in p for p in report)
    assert main(["--check", "--readme", str(repo / "README.md"), "--root", str(repo)]) == 1


def test_an_unknown_block_is_reported(repo):
    readme = repo / "README.md"
    readme.write_text(readme.read_text() + f"\n{BEGIN.format('nope')}\nx\n{END}\n")
    assert any("unknown block 'nope'" in p for p in check(readme, repo))
