"""Packaging and layering: the import graph has no cycles, the core is a leaf, the runtime stands
alone on an edge device, and no module reaches into another's private names."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# folder -> the package it installs as (pyproject.toml [tool.setuptools.package-dir])
PACKAGES = {"core": "dsexport.core", "runtime": "dsexport.runtime", "targets": "dsexport.targets",
            "calibration": "dsexport.calibration", "exporter": "dsexport.exporter", "src/dsexport": "dsexport"}
BUILD_SIDE = ("torch", "transformers", "onnx")


def _modules() -> dict[str, Path]:
    modules = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            modules[".".join([package, *parts])] = path
    return modules


def _imports(name: str, path: Path) -> list[tuple[str, list[str], bool]]:
    """(imported module, names imported from it, lazy) for every import in the file, eager (module
    level) and lazy (inside functions, including module __getattr__)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    lazy_nodes = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f)}
    out = []
    for node in ast.walk(tree):
        lazy = id(node) in lazy_nodes
        if isinstance(node, ast.Import):
            out += [(a.name, [], lazy) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((target, [a.name for a in node.names], lazy))
    return out


def _graph() -> tuple[dict[str, set[str]], dict[str, list]]:
    modules = _modules()
    edges, raw = {m: set() for m in modules}, {}
    for name, path in modules.items():
        raw[name] = _imports(name, path)
        for target, names, _ in raw[name]:
            if target in modules and target != name:  # (`from . import module` in a package's __init__)
                edges[name].add(target)
            for n in names:  # `from pkg import module`
                if f"{target}.{n}" in modules:
                    edges[name].add(f"{target}.{n}")
    return edges, raw


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _group(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ("core", "runtime", "targets", "calibration", "exporter",
                                                         "build", "cli") else "dsexport"


def test_no_import_cycles_between_modules_or_packages():
    edges, _ = _graph()
    assert _cycle(edges) is None, f"import cycle: {' -> '.join(_cycle(edges))}"
    groups: dict[str, set[str]] = {}
    for module, targets in edges.items():
        for target in targets:
            if _group(module) != _group(target):
                groups.setdefault(_group(module), set()).add(_group(target))
    assert _cycle(groups) is None, f"package cycle: {' -> '.join(_cycle(groups))}"


def test_the_core_imports_nothing_of_dsexport_and_only_numpy_beyond_the_standard_library():
    _, raw = _graph()
    for module, imports in raw.items():
        if not module.startswith("dsexport.core"):
            continue
        for target, _, _ in imports:
            top = target.split(".")[0]
            assert not target.startswith("dsexport.") or target.startswith("dsexport.core"), f"{module} imports {target}"
            assert top in sys.stdlib_module_names or top in ("numpy", "dsexport", "__future__"), f"{module} imports {target}"


def test_runtime_imports_no_torch_and_nothing_from_the_build_side():
    _, raw = _graph()
    for module, imports in raw.items():
        if not module.startswith("dsexport.runtime"):
            continue
        for target, _, _ in imports:
            assert target.split(".")[0] not in BUILD_SIDE, f"{module} imports {target}"
            if target.startswith("dsexport."):
                assert _group(target) in ("core", "runtime"), f"{module} imports {target}"


def test_no_private_names_are_imported_across_modules():
    _, raw = _graph()
    for module, imports in raw.items():
        for target, names, _ in imports:
            if target.startswith("dsexport") and target != module:
                private = [n for n in names if n.startswith("_") and n != "__version__"]
                assert not private, f"{module} imports {private} from {target}"


def test_runtime_dependencies_are_the_edge_set():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {d.split("=")[0].split(">")[0].split("<")[0].strip() for d in project["dependencies"]}
    assert names == {"numpy", "onnxruntime", "tokenizers", "safetensors", "click", "jinja2"}
    assert any(d.startswith("onnxruntime==") for d in project["dependencies"]), "onnxruntime is pinned"


def test_the_repository_root_does_not_shadow_the_installed_package():
    """Python run from the repository root imports the installed dsexport, not a folder of that name."""
    assert not (ROOT / "dsexport").exists()


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
