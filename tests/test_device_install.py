"""The device-side commands on a runtime-only install: a process where importing torch, onnx and
transformers fails, as on a device after `pip install dsexport`. Each command runs the real CLI
entry point on real bundles built by the test session."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

REFUSED = ("torch", "onnx", "transformers")


def _run_without_build_side(tmp_path, commands: list[list[str]]) -> list[dict]:
    """Run each command with `dsexport.cli.main` in one process where torch, onnx and transformers
    cannot be imported; returns exit code, stdout, stderr per command."""
    script = tmp_path / "device.py"
    script.write_text(textwrap.dedent(f"""
        import contextlib, io, json, sys
        class Refuse:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {REFUSED!r}:
                    raise ImportError(f"No module named {{name!r}}")
        sys.meta_path.insert(0, Refuse())
        from dsexport.cli import main
        results = []
        for argv in json.loads(sys.argv[1]):
            out, err = io.StringIO(), io.StringIO()
            sys.argv = ["dsexport", *argv]
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    main()
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else 1
            results.append({{"code": code, "out": out.getvalue(), "err": err.getvalue()}})
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {REFUSED!r})
        print(json.dumps({{"results": results, "loaded": loaded}}))
    """))
    proc = subprocess.run([sys.executable, str(script), json.dumps(commands)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["loaded"] == [], f"imported on the device: {report['loaded']}"
    return report["results"]


def _one_error_line(result: dict, code: int, words: str) -> None:
    lines = [line for line in result["err"].strip().splitlines() if line]
    assert result["code"] == code, result
    assert lines and lines[-1].startswith("error: ") and words in lines[-1], result
    assert "Traceback" not in result["err"]


@pytest.fixture(scope="module")
def bundles(artifacts):
    return {"x86": artifacts.export("v3_noaux_tc"), "jetson": artifacts.export_target("v3_noaux_tc"),
            "ckpt": artifacts.checkpoint("v3_noaux_tc")}


def test_device_commands_work_without_torch_or_onnx(bundles, tmp_path):
    x86, jetson, ckpt = str(bundles["x86"]), str(bundles["jetson"]), str(bundles["ckpt"])
    commands = [
        ["run", x86, "--prompt", "The quick brown fox", "--max-new-tokens", "8", "--json"],
        ["validate", x86, "--json"],
        ["inspect", x86, "--json", "--verify"],
        ["plan", "--model", ckpt, "--target", "jetson-orin-nano-8gb", "--precision", "int4", "--block-size", "64",
         "--json"],
        ["targets", "--json"],
        ["check", jetson, "--json"],
        ["engine", jetson],
        ["build", "--model", ckpt, "--out", str(tmp_path / "b")],
        ["calibrate", "--model", ckpt, "--data", x86, "--out", str(tmp_path / "p")],
        ["validate", x86, "--reference", ckpt],
        ["check", jetson, "--tensorrt", "10.13"],
    ]
    run, validate, inspect, plan, targets, check, engine, build, calibrate, reference, check_new = \
        _run_without_build_side(tmp_path, commands)
    assert run["code"] == 0 and len(json.loads(run["out"])["output_ids"]) == 8, run
    assert validate["code"] == 0 and json.loads(validate["out"])["passed"], validate
    assert inspect["code"] == 0 and json.loads(inspect["out"])["architecture"] == "deepseek_v3", inspect
    p = json.loads(plan["out"])
    assert plan["code"] == 0 and p["build"]["quantization"]["block_size"] == 64, plan
    assert targets["code"] == 0 and any(t["name"] == "x86-cpu" for t in json.loads(targets["out"])), targets
    c = json.loads(check["out"])
    assert check["code"] == 0 and c["ok"] and all(r["recorded_at_build"] for r in c["reports"]), check
    _one_error_line(engine, 3, "TensorRT is not installed")  # up to the point where TensorRT is needed
    assert not (tmp_path / "b").exists()
    for result in (build, calibrate, reference):
        _one_error_line(result, 2, 'pip install "dsexport[export]"')
    _one_error_line(check_new, 2, "needs the onnx package")
