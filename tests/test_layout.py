"""Packaging and layering: the runtime stands alone on an edge device."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_RUNTIME = ("torch", "transformers", "onnx", "exporter", "targets", "calibration")


def test_runtime_imports_no_torch_and_nothing_from_the_build_side():
    for path in (ROOT / "runtime").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] if node.level == 0 else [f".{node.module}"]
            for name in names:
                parts = name.lstrip(".").split(".")
                head = parts[1] if parts[0] == "dsexport" and len(parts) > 1 else parts[0]
                assert head not in FORBIDDEN_IN_RUNTIME, f"{path.relative_to(ROOT)} imports {name}"


def test_runtime_dependencies_are_the_edge_set():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {d.split("=")[0].split(">")[0].split("<")[0].strip() for d in project["dependencies"]}
    assert names == {"numpy", "onnxruntime", "tokenizers", "safetensors", "click", "jinja2"}
    assert any(d.startswith("onnxruntime==") for d in project["dependencies"]), "onnxruntime is pinned"


def test_runtime_generates_in_a_process_where_torch_cannot_be_imported(artifacts, tmp_path):
    bundle = artifacts.export("v3_flat_tied")
    from dsexport.runtime import Engine

    expected = Engine.load(bundle, threads=1).generate("The quick brown fox", max_new_tokens=12, ignore_eos=True).output_ids
    script = tmp_path / "edge.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        class Refuse:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "onnx"):
                    raise ImportError(f"{{name}} is not installed on this device")
        sys.meta_path.insert(0, Refuse())
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("torch imported")
        from dsexport.runtime import Engine
        out = Engine.load({str(bundle)!r}, threads=1).generate("The quick brown fox", max_new_tokens=12, ignore_eos=True)
        assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "onnx")]
        print(out.output_ids)
    """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(expected)
