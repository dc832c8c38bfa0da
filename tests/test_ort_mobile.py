"""ONNX Runtime Mobile packaging: an x86-cpu bundle converted to ORT format decodes the same tokens.

The phone's decode loop (docs/mobile.md) is written out here against the converted `model.ort`
with onnxruntime on this machine, and compared token for token with the runtime's Engine on the
original bundle.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import dsexport.targets.mobile as mobile
from dsexport.core.errors import BundleError, UserError
from dsexport.exporter import ort_mobile
from dsexport.core.files import sha256_file
from dsexport.exporter.ort_mobile import CONFIG_FILE, ORT_FILE, convert_to_ort
from dsexport.runtime import Engine
from dsexport.targets import TARGETS

VARIANTS = ("v3_noaux_tc", "v2_greedy")
PROMPTS = ("The quick brown fox", "Once upon a time there was", "1 2 3", "a")
NEW_TOKENS = 16


def _convert_copy(src: Path, dst: Path, style: str = "Fixed") -> dict:
    """Copy an x86-cpu bundle, convert the copy and point its manifest at model.ort (as a build would)."""
    shutil.copytree(src, dst)
    info = convert_to_ort(dst, optimization_style=style)
    manifest = json.loads((dst / "manifest.json").read_text())
    decoder = manifest["graphs"]["decoder"]
    decoder.pop("data")
    decoder.update(info)
    manifest.pop("native", None)  # the .ort file holds the weights: no native section (as export_mobile writes)
    for name in ("model.onnx", "model.onnx.data"):  # the manifest lists the files the bundle has
        manifest["files"].pop(name)
    for name in (info["file"], info["required_operators"]):
        manifest["files"][name] = {"bytes": (dst / name).stat().st_size, "sha256": sha256_file(dst / name)}
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return info


class OrtDecoder:
    """The app's decode loop (docs/mobile.md) on this machine's onnxruntime: greedy, left-padded batches."""

    def __init__(self, bundle: Path, target: str = "android-arm64"):
        self.manifest = json.loads((bundle / "manifest.json").read_text())
        model = self.manifest["model"]
        self.layers = int(model["num_hidden_layers"])
        self.latent = int(model["kv_lora_rank"]) + int(model["qk_rope_head_dim"])
        decoder = self.manifest["graphs"]["decoder"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        entries = {**mobile.EP_SETTINGS[target]["session"]["config_entries"], **decoder.get("session_config", {})}
        for key, value in entries.items():
            options.add_session_config_entry(key, value)
        # This machine's wheel has neither XNNPACK nor CoreML: the CPU EP, the parity baseline.
        self.session = ort.InferenceSession(str(bundle / decoder["file"]), options, providers=["CPUExecutionProvider"])
        self.outputs = ["logits"] + [f"present_latent.{i}" for i in range(self.layers)]

    def _run(self, ids, positions, mask, cache):
        feed = {"input_ids": ort.OrtValue.ortvalue_from_numpy(ids),
                "position_ids": ort.OrtValue.ortvalue_from_numpy(positions),
                "attention_mask": ort.OrtValue.ortvalue_from_numpy(mask)}
        feed.update({f"past_latent.{i}": c for i, c in enumerate(cache)})
        out = self.session.run_with_ort_values(self.outputs, feed)
        return out[0].numpy(), out[1:]

    def greedy(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        B, longest = len(prompts), max(map(len, prompts))
        ids = np.zeros((B, longest), np.int64)
        mask = np.zeros((B, longest), np.int64)
        for b, p in enumerate(prompts):  # left padding: every row's last real token in the last column
            ids[b, longest - len(p):] = p
            mask[b, longest - len(p):] = 1
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        empty = np.zeros((B, 0, self.latent), np.float32)
        cache = [ort.OrtValue.ortvalue_from_numpy(empty) for _ in range(self.layers)]
        logits, cache = self._run(ids, positions, mask, cache)
        next_pos = positions[:, -1:] + 1
        out: list[list[int]] = [[] for _ in prompts]
        for step in range(new_tokens):
            token = logits[:, -1].argmax(-1)
            for b in range(B):
                out[b].append(int(token[b]))
            if step == new_tokens - 1:
                break
            mask = np.concatenate([mask, np.ones((B, 1), np.int64)], axis=1)  # grows by one column per token
            logits, cache = self._run(token[:, None].astype(np.int64), next_pos, mask, cache)  # present -> past
            next_pos = next_pos + 1
        return out


@pytest.fixture(scope="module", params=VARIANTS)
def converted(request, artifacts, tmp_path_factory):
    src = artifacts.export(request.param)
    dst = tmp_path_factory.mktemp("ort") / "bundle"
    onnx_bytes = (src / "model.onnx").stat().st_size + (src / "model.onnx.data").stat().st_size
    info = _convert_copy(src, dst)
    return src, dst, info, onnx_bytes


@pytest.fixture(scope="module")
def engines():
    cache = {}

    def get(path: Path) -> Engine:
        if path not in cache:
            cache[path] = Engine.load(path, threads=2)
        return cache[path]

    return get


def test_bundle_ships_only_the_ort_model(converted):
    src, dst, info, onnx_bytes = converted
    assert not (dst / "model.onnx").exists() and not (dst / "model.onnx.data").exists()
    assert not [p for p in dst.iterdir() if p.name.startswith(".")]  # no conversion leftovers
    assert info["file"] == ORT_FILE and info["format"] == "ort" and info["required_operators"] == CONFIG_FILE
    assert info["optimization_style"] == "Fixed" and info["onnxruntime_version"] == ort.__version__
    assert info["bytes"] == (dst / ORT_FILE).stat().st_size
    # All weights are embedded (no external data in .ort): the file is the weights plus the graph.
    assert onnx_bytes * 0.9 < info["bytes"] < onnx_bytes * 1.3, (info["bytes"], onnx_bytes)


def _body(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_config_keeps_the_fused_moe_op(converted, tmp_path):
    from onnxruntime.tools.ort_format_model import create_config_from_models
    from onnxruntime.tools.reduced_build_config_parser import parse_config

    _, dst, _, _ = converted
    text = (dst / CONFIG_FILE).read_text()
    create_config_from_models([dst / ORT_FILE], tmp_path / "direct.config", True)
    assert _body(text) == _body((tmp_path / "direct.config").read_text())  # the tool's entries, unchanged
    required, _ = parse_config(str(dst / CONFIG_FILE), True)  # the parser the minimal build uses
    assert "MoE" in required["com.microsoft"][1]
    assert "MatMul" in {op for ops in required["ai.onnx"].values() for op in ops}
    assert '{"inputs": {"0": ["float"]}}' in text  # type reduction recorded
    assert "/tmp" not in text and str(dst) not in text  # no build-machine paths


@pytest.mark.parametrize("batched", [False, True])
def test_greedy_tokens_equal_the_x86_bundle(converted, engines, batched):
    src, dst, _, _ = converted
    engine = engines(src)
    prompts = [engine.encode(p) for p in PROMPTS]
    expected = [g.output_ids for g in engine.generate_batch(prompts, max_new_tokens=NEW_TOKENS, ignore_eos=True)] \
        if batched else [engine.generate(p, max_new_tokens=NEW_TOKENS, ignore_eos=True).output_ids for p in prompts]
    decoder = OrtDecoder(dst)
    got = decoder.greedy(prompts, NEW_TOKENS) if batched else [decoder.greedy([p], NEW_TOKENS)[0] for p in prompts]
    assert got == expected


def test_the_python_runtime_loads_the_converted_bundle(converted, engines):
    """Engine reads graphs.decoder.file, so a manifest pointing at model.ort (no "data") loads too."""
    src, dst, _, _ = converted
    prompt = engines(src).encode(PROMPTS[0])
    engine = Engine.load(dst, threads=2, verify=False)  # checksums are the build's to rewrite after conversion
    assert engine.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True).output_ids == \
        engines(src).generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True).output_ids


def test_greedy_tokens_equal_the_reference_golden_outputs(converted):
    """golden.json (kept in the mobile bundle) holds the reference model's greedy tokens: the same
    self-test an app can run on the phone."""
    _, dst, _, _ = converted
    golden = json.loads((dst / "golden.json").read_text())
    decoder = OrtDecoder(dst)
    for case in golden["cases"]:
        assert decoder.greedy([case["prompt_ids"]], golden["new_tokens"])[0] == case["output_ids"]


def test_runtime_style_decodes_the_same_tokens(artifacts, engines, tmp_path):
    src = artifacts.export("v3_noaux_tc")
    info = _convert_copy(src, tmp_path / "bundle", style="Runtime")
    assert info["session_config"] == {"session.enable_saved_runtime_optimizations": "1"}
    engine = engines(src)
    prompts = [engine.encode(p) for p in PROMPTS]
    expected = [engine.generate(p, max_new_tokens=NEW_TOKENS, ignore_eos=True).output_ids for p in prompts]
    decoder = OrtDecoder(tmp_path / "bundle", "ios-arm64")
    assert [decoder.greedy([p], NEW_TOKENS)[0] for p in prompts] == expected


def test_refuses_a_model_over_the_flatbuffer_cap(artifacts, tmp_path, monkeypatch):
    src = artifacts.export("v3_noaux_tc")
    dst = tmp_path / "bundle"
    shutil.copytree(src, dst)
    monkeypatch.setattr(ort_mobile, "ORT_FORMAT_MAX_BYTES", 100_000)
    with pytest.raises(UserError) as err:
        convert_to_ort(dst)
    message = str(err.value)
    assert "\n" not in message and "GiB (100000 bytes)" in message and "int4" in message and "external data" in message
    # nothing was touched
    assert (dst / "model.onnx").is_file() and (dst / "model.onnx.data").is_file()
    assert not (dst / ORT_FILE).exists() and not (dst / CONFIG_FILE).exists()
    assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in src.iterdir())


def test_missing_pieces_are_bundle_errors(artifacts, tmp_path):
    src = artifacts.export("v3_noaux_tc")
    with pytest.raises(BundleError):
        convert_to_ort(tmp_path)  # no model.onnx
    dst = tmp_path / "bundle"
    shutil.copytree(src, dst)
    (dst / "model.onnx.data").unlink()
    with pytest.raises(BundleError, match="external data"):
        convert_to_ort(dst)
    with pytest.raises(UserError, match="optimization style"):
        convert_to_ort(dst, optimization_style="Eager")


def test_mobile_profiles():
    for name, ep in (("android-arm64", "XnnpackExecutionProvider"), ("ios-arm64", "CoreMLExecutionProvider")):
        target = TARGETS[name]
        assert target.backend == "onnxruntime-mobile" and target.moe_lowering == "ort-moe"
        assert target.execution_providers == (ep, "CPUExecutionProvider")
        assert target.precisions == ("fp32", "int8", "int4") and target.device is not None
        settings = mobile.EP_SETTINGS[name]
        assert [p["name"] for p in settings["providers"]][-1] == "CPU"
        assert all(isinstance(v, str) for p in settings["providers"] for v in p["options"].values())
        assert target.moe_shards == settings["session"]["intra_op_num_threads"]
        assert mobile.ORT_OPTIMIZATION_STYLE[name] in ort_mobile.OPTIMIZATION_STYLES
    assert json.loads(json.dumps(mobile.EP_SETTINGS)) == mobile.EP_SETTINGS  # copies into the manifest as is


@pytest.mark.parametrize("target", ["android-arm64", "ios-arm64"])
def test_build_for_a_phone_makes_an_ort_bundle_with_the_x86_tokens(artifacts, engines, run_cli, tmp_path, target):
    """`dsexport build --target android-arm64`: the whole build path (export, conversion, verify
    with golden outputs, checksums); the .ort model generates the x86 bundle's greedy tokens."""
    out = tmp_path / target
    code, _, err = run_cli("build", "--model", artifacts.checkpoint("v2_group_limited"), "--target", target,
                           "--out", out)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["graphs"]["decoder"]["file"] == ORT_FILE and "data" not in manifest["graphs"]["decoder"]
    assert {ORT_FILE, CONFIG_FILE} <= set(manifest["files"]) and not list(out.glob("*.onnx*"))
    assert manifest["mobile"]["execution_providers"] == mobile.EP_SETTINGS[target]
    x86 = engines(artifacts.export("v2_group_limited"))
    phone = Engine.load(out, threads=2)
    rng = np.random.default_rng(3)
    for prompt in ([7], rng.integers(0, int(x86.config.vocab_size), 23).tolist()):
        assert phone.generate(prompt, max_new_tokens=24, ignore_eos=True).output_ids == \
            x86.generate(prompt, max_new_tokens=24, ignore_eos=True).output_ids
