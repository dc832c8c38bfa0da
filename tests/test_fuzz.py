"""A seeded mutator over real manifests, golden files and safetensors headers: no mutation gives a
traceback, and no mutated bundle or checkpoint is accepted (docs/security.md).

Each case mutates one node of the real JSON (delete it, change its type, an out-of-range or
hostile value, a path with `..`, a list grown or cut) and feeds the result to the same code the
CLI uses. Every outcome must be a dsexport UserError (one line, a documented exit code) or, for a
mutation that leaves the file equivalent, a clean pass; a manifest or golden file that changed in
substance never verifies and validates."""

from __future__ import annotations

import copy
import json
import random
import shutil
from pathlib import Path

import pytest

from dsexport.core.errors import UserError
from dsexport.core.files import sha256_file

CASES = {"manifest": 300, "golden": 150, "safetensors": 200}
HOSTILE = [None, True, -1, 0, 10**12, 2.5, -1e308, "", "x", "../etc/passwd", "/etc/passwd", "a\x00b", [], {}, [1, "a"],
           {"k": [None]}]


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node[:6]):  # the first items of long lists are enough
            yield from _paths(v, prefix + (i,))


def mutate(doc, rng: random.Random):
    """A copy of doc with one node changed; (copy, description)."""
    doc = copy.deepcopy(doc)
    paths = [p for p in _paths(doc) if p]
    path = rng.choice(paths)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    key, value = path[-1], parent[path[-1]]
    op = rng.choice(["delete", "hostile", "number", "string", "list"])
    if op == "delete" and isinstance(parent, dict):
        del parent[key]
    elif op == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
        parent[key] = rng.choice([value * 10 + 1, -value - 1, value + 1, 2**63, value / 3 + 0.5])
    elif op == "string" and isinstance(value, str):
        parent[key] = rng.choice(["../" + value, "/" + value, value + "/..", value[::-1] + "x", value * 2 + "!"])
    elif op == "list" and isinstance(value, list):
        parent[key] = rng.choice([value + value[-1:] if value else [0], value[:-1], value[::-1] + [None]])
    else:
        parent[key] = rng.choice(HOSTILE)
    return doc, f"{op} {'.'.join(map(str, path))}"


@pytest.fixture(scope="module")
def sealed(artifacts, tmp_path_factory) -> Path:
    """An int4 bundle: its manifest has every optional section a CPU bundle can have."""
    from dsexport.build import BuildConfig, build_bundle

    path = tmp_path_factory.mktemp("fuzz") / "bundle"
    build_bundle(BuildConfig(artifacts.checkpoint("v3_noaux_tc"), path, precision="int4"))
    return path


def test_mutated_manifests_never_traceback_and_never_verify(sealed, tmp_path):
    from dsexport.runtime.bundle import read_bundle

    original = json.loads((sealed / "manifest.json").read_text())
    work = Path(shutil.copytree(sealed, tmp_path / "b"))
    rng, outcomes = random.Random(13), {"refused": 0, "unchanged": 0}
    for _ in range(CASES["manifest"]):
        doc, what = mutate(original, rng)
        (work / "manifest.json").write_text(json.dumps(doc))
        try:
            read_bundle(work, verify=True)
        except UserError as e:
            assert "\n" not in str(e), what
            outcomes["refused"] += 1
            continue
        assert doc == original, f"a mutated manifest verified: {what}"
        outcomes["unchanged"] += 1
    assert outcomes["refused"] >= CASES["manifest"] * 0.9, outcomes
    print(f"manifest fuzz: {CASES['manifest']} cases, {outcomes}")


# fields a golden file carries for reporting only: a change there need not fail validation
GOLDEN_INFORMATIVE = ("routes", "uncovered", "producer")


def test_mutated_golden_files_never_traceback_and_never_pass(artifacts, tmp_path):
    """Unsigned, a mutated golden file fails its checksum; here it is re-signed (an attacker who
    edits two files, or a broken tool), on an fp32 bundle whose golden check is exact: a mutation
    must be refused or fail validation, except in fields kept for reporting."""
    from dsexport.runtime import Engine
    from dsexport.runtime.golden import validate_golden
    from dsexport.runtime.validate import Thresholds

    sealed = artifacts.export("v3_noaux_tc")
    original = json.loads((sealed / "golden.json").read_text())
    work = Path(shutil.copytree(sealed, tmp_path / "b"))
    manifest = json.loads((work / "manifest.json").read_text())
    rng, outcomes = random.Random(7), {"refused": 0, "failed": 0, "passed": 0}
    for _ in range(CASES["golden"]):
        doc, what = mutate(original, rng)
        (work / "golden.json").write_text(json.dumps(doc))  # re-signed: the manifest lists the new checksum
        manifest["files"]["golden.json"] = {"bytes": (work / "golden.json").stat().st_size,
                                            "sha256": sha256_file(work / "golden.json")}
        (work / "manifest.json").write_text(json.dumps(manifest))
        try:
            engine = Engine.load(work)
            report = validate_golden(engine, Thresholds.for_bundle(engine.manifest), 0.03)
        except UserError as e:
            assert "\n" not in str(e), what
            outcomes["refused"] += 1
            continue
        if report.passed:
            assert doc == original or any(f in what for f in GOLDEN_INFORMATIVE), f"a mutated golden file passed: {what}"
            outcomes["passed"] += 1
        else:
            outcomes["failed"] += 1
    print(f"golden fuzz: {CASES['golden']} cases, {outcomes}")


def test_mutated_safetensors_headers_never_traceback_and_never_load(artifacts, tmp_path):
    from dsexport.exporter.checkpoint import CheckpointReader
    from dsexport.exporter.reference import iter_reference_tensors

    ckpt = Path(shutil.copytree(artifacts.checkpoint("v3_noaux_tc"), tmp_path / "ckpt"))
    raw = (ckpt / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    rng, outcomes = random.Random(3), {"refused": 0, "unchanged": 0}
    for _ in range(CASES["safetensors"]):
        doc, what = mutate(header, rng)
        text = json.dumps(doc).encode()
        (ckpt / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + data)
        try:
            reader = CheckpointReader(ckpt)
            for _name, _tensor in iter_reference_tensors(reader):  # every tensor the build reads
                pass
        except UserError as e:
            assert "\n" not in str(e), what
            outcomes["refused"] += 1
            continue
        assert {k: v for k, v in doc.items() if k != "__metadata__"} == \
            {k: v for k, v in header.items() if k != "__metadata__"}, f"a mutated header loaded: {what}"
        outcomes["unchanged"] += 1
    print(f"safetensors fuzz: {CASES['safetensors']} cases, {outcomes}")
