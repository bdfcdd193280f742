"""The typed hand-offs between assets (`pipeline.upstream.AssetRecord`, one per asset folder's ``record.py``).

- Every record survives a real Dagster materialization: written as metadata, read back whole and equal.
- A materialization without a complete record is refused with what to do, not read half.
- Every attribute that pipeline/ reads from a record is one of its fields: a renamed field fails here, not in a run.
  The reads are found statically: function parameters annotated with a record class, names bound to
  ``read_upstream(context, R)`` / ``<that>.record`` / ``R(...)`` / ``R.from_metadata(...)``, and
  ``<upstream>.record.<field>``.
"""

import ast
import importlib
import pkgutil
import types
import typing
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

import pipeline
import pipeline.defs
from pipeline.definitions import defs
from pipeline.upstream import AssetRecord, read_upstream

PIPELINE_DIR = Path(pipeline.__file__).parent


def _records() -> dict[str, type[AssetRecord]]:
    for info in pkgutil.iter_modules(pipeline.defs.__path__):
        if info.ispkg:
            importlib.import_module(f"pipeline.defs.{info.name}.record")
    return {cls.__name__: cls for cls in AssetRecord.__subclasses__() if cls.__module__.startswith("pipeline.defs.")}


RECORDS = _records()

SAMPLES = {str: "s", int: 3, float: 0.5, bool: True}


def _sample(annotation: Any) -> Any:
    """A value of a field's type: any record gets an example without a hand-kept list of them."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in SAMPLES:
        return SAMPLES[annotation]
    if origin in (types.UnionType, typing.Union):
        return None if type(None) in args else _sample(args[0])
    if origin is tuple:
        return tuple(_sample(a) for a in args)
    if origin is list:
        return [_sample(args[0])]
    if origin is dict:
        return {"key": {"nested": [1.5, "x"]}}
    raise TypeError(f"no sample for {annotation!r}: add one to SAMPLES")


def _example(cls: type[AssetRecord]) -> AssetRecord:
    return cls(**{name: _sample(field.annotation) for name, field in cls.model_fields.items()})


def test_every_asset_folder_has_a_record():
    assets = {info.name for info in pkgutil.iter_modules(pipeline.defs.__path__) if info.ispkg}
    assert {cls.asset for cls in RECORDS.values()} == assets


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_a_record_survives_a_real_materialization(name, tmp_path):
    record = _example(RECORDS[name])

    @dg.asset(name=record.asset)
    def writer() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={**record.to_metadata(), "display_only": 1})

    @dg.asset(deps=[writer])
    def reader(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        read = read_upstream(context, type(record))
        assert read.record == record and read.source == "this run"
        return dg.MaterializeResult()

    with dg.DagsterInstance.local_temp(str(tmp_path)) as instance:
        assert dg.materialize([writer, reader], instance=instance).success


def test_an_incomplete_record_is_refused_with_what_to_do(tmp_path):
    cls = RECORDS["ImageDatasetRecord"]
    partial = {k: v for k, v in _example(cls).to_metadata().items() if k != "dataset_url"}

    @dg.asset(name="image_dataset")
    def writer() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata=partial)

    @dg.asset(deps=[writer])
    def reader(context: dg.AssetExecutionContext) -> None:
        read_upstream(context, cls)

    with dg.DagsterInstance.local_temp(str(tmp_path)) as instance:
        result = dg.materialize([writer, reader], instance=instance, raise_on_error=False)
    assert not result.success
    [failure] = [e for e in result.all_events if e.is_step_failure]
    message = failure.step_failure_data.error.message
    assert "dataset_url" in message and "materialize image_dataset again" in message


# ---------------------------------------------------------------------------------------------------------------
# Every field read from a record exists
# ---------------------------------------------------------------------------------------------------------------


def _record_of(node: ast.expr, env: dict[str, tuple[str, str]]) -> tuple[str, str] | None:
    """("record" | "upstream" | "holder", class name) that the expression evaluates to, when it is one (a holder: a
    class of the same module with a field annotated with a record class)."""
    if isinstance(node, ast.Name) and node.id in env:
        return env[node.id]
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in env:
        kind, name = env[node.value.id]
        if kind == "holder" and node.attr in env.get("", {}).get(name, {}):
            return ("record", env[""][name][node.attr])
    if isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Name) and func.id == "read_upstream" and len(node.args) == 2:
            arg = node.args[1]
            if isinstance(arg, ast.Name) and arg.id in RECORDS:
                return ("upstream", arg.id)
        if isinstance(func, ast.Name) and func.id in RECORDS:
            return ("record", func.id)
        if isinstance(func, ast.Attribute) and func.attr == "from_metadata" and isinstance(func.value, ast.Name):
            if func.value.id in RECORDS:
                return ("record", func.value.id)
    if isinstance(node, ast.Attribute) and node.attr == "record":
        inner = _record_of(node.value, env)
        if inner is not None and inner[0] == "upstream":
            return ("record", inner[1])
    return None


def _bind(target: ast.expr, value: ast.expr, env: dict[str, tuple[str, str]]) -> None:
    if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple) and len(target.elts) == len(value.elts):
        for t, v in zip(target.elts, value.elts):
            _bind(t, v, env)
    elif isinstance(target, ast.Name) and (kind := _record_of(value, env)) is not None:
        env[target.id] = kind


def _annotation_record(annotation: ast.expr | None) -> str | None:
    if isinstance(annotation, ast.Name) and annotation.id in RECORDS:
        return annotation.id
    if isinstance(annotation, ast.Constant) and annotation.value in RECORDS:
        return annotation.value
    return None


def _holders(tree: ast.Module) -> dict[str, dict[str, str]]:
    """Classes of the module with fields annotated with a record class: {class: {field: record class}}."""
    holders: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            fields = {
                s.target.id: name
                for s in node.body
                if isinstance(s, ast.AnnAssign)
                and isinstance(s.target, ast.Name)
                and (name := _annotation_record(s.annotation)) is not None
            }
            if fields:
                holders[node.name] = fields
    return holders


def record_reads(source: str) -> list[tuple[int, str, str]]:
    """(line, record class, attribute) of every attribute read from a record in ``source``."""
    reads = []
    tree = ast.parse(source)
    holders = _holders(tree)
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        env: dict = {"": holders}
        args = func.args
        for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
            if (name := _annotation_record(arg.annotation)) is not None:
                env[arg.arg] = ("record", name)
            elif isinstance(arg.annotation, ast.Name) and arg.annotation.id in holders:
                env[arg.arg] = ("holder", arg.annotation.id)
            elif arg.arg == "self" and func.name != "__init__":
                owner = next((c for c in ast.walk(tree) if isinstance(c, ast.ClassDef) and func in c.body), None)
                if owner is not None and owner.name in holders:
                    env["self"] = ("holder", owner.name)
        statements = sorted(
            (n for n in ast.walk(func) if isinstance(n, (ast.Assign, ast.AnnAssign))), key=lambda n: n.lineno
        )
        for node in statements:
            if node.value is None:
                continue
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                _bind(target, node.value, env)
        for node in ast.walk(func):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                kind = _record_of(node.value, env)
                if kind is not None and kind[0] == "record":
                    reads.append((node.lineno, kind[1], node.attr))
    return sorted(set(reads))


def record_writes(source: str) -> list[tuple[int, str, str]]:
    """(line, record class, field) of every keyword a record is built with in ``source``."""
    return sorted(
        (node.lineno, node.func.id, kw.arg)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in RECORDS
        for kw in node.keywords
        if kw.arg is not None
    )


def record_field_errors(source: str, filename: str) -> list[str]:
    """``file:line: Record.attr`` for every attribute read from a record, or keyword it is built with, that the record
    does not have."""
    return [
        f"{filename}:{line}: {name}.{attr}"
        for line, name, attr in [*record_reads(source), *record_writes(source)]
        if attr not in RECORDS[name].model_fields and not hasattr(RECORDS[name], attr)
    ]


def _pipeline_sources() -> list[Path]:
    return sorted(PIPELINE_DIR.rglob("*.py"))


def test_every_field_read_from_a_record_exists():
    errors = []
    for path in _pipeline_sources():
        errors += record_field_errors(path.read_text(), str(path.relative_to(PIPELINE_DIR.parent)))
    assert not errors, "attributes that no record has:\n" + "\n".join(errors)


def test_the_field_reads_are_found_in_every_module_that_reads_a_record():
    """The checker sees the reads of every module that reads a record (else the test above could pass by seeing
    nothing), and between them they read every field a record declares: a record holds what downstream needs."""
    readers = [p for p in _pipeline_sources() if "read_upstream(context, " in p.read_text() and p.name != "upstream.py"]
    assert len(readers) >= 6  # the four downstream assets' and the three checks modules' reads
    read: set[tuple[str, str]] = set()
    for path in readers:
        reads = record_reads(path.read_text())
        assert reads, f"{path}: no record reads found"
        read |= {(name, attr) for _, name, attr in reads}
    # what a leaf asset (the evaluation report) records is read by people (the Dagster UI, the tests), not by a step
    graph = defs.resolve_asset_graph()
    leaves = {k.to_user_string() for k in graph.get_all_asset_keys() if not graph.get(k).child_keys}
    unread = [
        f"{name}.{field}"
        for name, cls in RECORDS.items()
        if cls.asset not in leaves
        for field in cls.model_fields
        if (name, field) not in read
    ]
    assert not unread, f"record fields no step reads: {unread}"


def test_a_renamed_field_is_caught():
    source = """
def reader(context):
    ds = read_upstream(context, ImageDatasetRecord).record
    return ds.dataset_uri

def by_annotation(vae: VaeModelRecord):
    return vae.latent_shape, vae.vae_urll

def through_the_read(context):
    read = read_upstream(context, LatentStoreRecord)
    store = read.record
    return read.record.store_url, read.record.stor_url, store.context_dims, read.run_id

def writer():
    return LdmModelRecord(ldm_url="u", ldm_uri="models:/ldm/1", ldm_versoin=1)
"""
    assert set(record_field_errors(source, "x.py")) == {
        "x.py:12: LatentStoreRecord.stor_url",
        "x.py:12: LatentStoreRecord.context_dims",
        "x.py:4: ImageDatasetRecord.dataset_uri",
        "x.py:7: VaeModelRecord.vae_urll",
        "x.py:15: LdmModelRecord.ldm_versoin",
    }
