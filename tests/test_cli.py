"""The command line as users and their scripts meet it: outputs, the bundle, and errors."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from safetensors.torch import load_file, save_file

from dsexport.cli import main


def assert_clean_error(code: int, err: str, expected_code: int, words: str) -> None:
    assert code == expected_code, err
    # progress lines may come first; the error is one line, the last, and there is no traceback
    lines = [line for line in err.strip().splitlines() if line]
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == [lines[-1]] and words in lines[-1], err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def bundle(artifacts, tmp_path_factory):
    """A bundle built through the CLI."""
    out = tmp_path_factory.mktemp("cli") / "tiny"
    mp = pytest.MonkeyPatch()
    mp.setattr(sys, "argv", ["dsexport", "build", "--model", str(artifacts.checkpoint("v3_noaux_tc")), "--out", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    mp.undo()
    assert exit_info.value.code == 0
    return out


def test_build_writes_a_complete_verified_bundle(bundle):
    from dsexport.runtime.bundle import read_bundle, sha256_file

    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["format"] == "dsexport-bundle" and manifest["schema_version"] == 2
    assert manifest["target"]["name"] == "x86-cpu" and manifest["precision"] == "fp32"
    assert {"dsexport", "onnx", "onnxruntime", "torch", "numpy", "tokenizers", "python"} <= set(manifest["producer"])
    files = {p.name for p in bundle.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == files
    assert {"model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json"} <= files
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(bundle / name)
    assert [i["name"] for i in manifest["graphs"]["decoder"]["inputs"]][:3] == ["input_ids", "position_ids", "attention_mask"]
    read_bundle(bundle, verify=True)
    assert not [p for p in bundle.parent.iterdir() if ".partial-" in p.name]


def test_run_json_is_the_documented_object(bundle, run_cli):
    from dsexport.runtime import Engine

    code, out, _ = run_cli("run", bundle, "--prompt", "The quick brown fox", "--max-new-tokens", 12, "--json")
    assert code == 0
    result = json.loads(out)
    # draft_decision: --draft auto (the default) on a bundle with an MTP graph; draft: when it drafted
    assert set(result) - {"draft_decision", "draft"} == {"prompt_ids", "output_ids", "text", "finish_reason", "ttft_s",
                                                         "prefill_tokens_per_s", "decode_tokens_per_s"}
    assert set(result["draft_decision"]) == {"draft", "reason", "token_ms", "verify_ms", "acceptance_prior",
                                             "predicted_speedup"}
    assert ("draft" in result) == result["draft_decision"]["draft"]
    expected = Engine.load(bundle).generate("The quick brown fox", max_new_tokens=12)
    assert result["output_ids"] == expected.output_ids and result["prompt_ids"] == expected.prompt_ids
    assert result["text"] == expected.text
    assert result["ttft_s"] > 0 and result["prefill_tokens_per_s"] > 0


def test_run_streams_the_same_text(bundle, run_cli):
    _, out_json, _ = run_cli("run", bundle, "--prompt", "Experts", "--max-new-tokens", 10, "--json")
    code, out, _ = run_cli("run", bundle, "--prompt", "Experts", "--max-new-tokens", 10)
    assert code == 0 and out == json.loads(out_json)["text"] + "\n"


def test_run_chat_applies_the_template(bundle, run_cli):
    from dsexport.runtime import Engine

    engine = Engine.load(bundle)
    rendered = engine.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert rendered.startswith("<bos>User: Hi") and rendered.endswith("Assistant:")
    _, out, _ = run_cli("run", bundle, "--prompt", "Hi", "--chat", "--max-new-tokens", 2, "--json")
    # the template's control tokens are control tokens; the user's content is text
    assert json.loads(out)["prompt_ids"] == engine.encode(rendered, parse_special=True)


def test_sampling_flags_reach_the_sampler(bundle, run_cli):
    args = ["run", bundle, "--prompt", "A", "--max-new-tokens", 16, "--json", "--temperature", 1.0, "--top-k", 50,
            "--top-p", 0.9, "--repetition-penalty", 1.1]
    a = json.loads(run_cli(*args, "--seed", 1)[1])["output_ids"]
    b = json.loads(run_cli(*args, "--seed", 1)[1])["output_ids"]
    c = json.loads(run_cli(*args, "--seed", 2)[1])["output_ids"]
    assert a == b != c


def test_inspect_json_reports_structure_and_sizes(bundle, run_cli):
    code, out, _ = run_cli("inspect", bundle, "--json")
    s = json.loads(out)
    assert code == 0 and s["architecture"] == "deepseek_v3" and s["num_layers"] == 3
    assert [x["routed_experts"] for x in s["layers"]] == [0, 16, 16]
    assert s["cache_bytes_per_token"] == 3 * (32 + 8) * 4
    assert s["files"]["model.onnx.data"] == (bundle / "model.onnx.data").stat().st_size
    code, out, _ = run_cli("inspect", bundle)
    assert code == 0 and "noaux_tc" in out and "per token (latent)" in out


def test_targets_lists_x86_cpu(run_cli):
    code, out, _ = run_cli("targets", "--json")
    assert code == 0 and "x86-cpu" in [t["name"] for t in json.loads(out)]


# ---- errors: one line, the right exit code, nothing lost -------------------------------------
def test_existing_output_is_not_overwritten(bundle, artifacts, run_cli):
    before = (bundle / "manifest.json").read_bytes()
    code, _, err = run_cli("build", "--model", artifacts.checkpoint("v3_noaux_tc"), "--out", bundle)
    assert_clean_error(code, err, 2, "exists and is not empty; pass --overwrite")
    assert (bundle / "manifest.json").read_bytes() == before


def test_overwrite_replaces_only_with_a_finished_bundle(artifacts, tmp_path, run_cli):
    out = tmp_path / "b"
    assert run_cli("build", "--model", artifacts.checkpoint("v2_greedy"), "--out", out)[0] == 0
    assert run_cli("build", "--model", artifacts.checkpoint("v3_noaux_tc"), "--out", out, "--overwrite")[0] == 0
    assert json.loads((out / "manifest.json").read_text())["model"]["model_type"] == "deepseek_v3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_interrupted_build_leaves_nothing_that_looks_complete(artifacts, tmp_path, monkeypatch):
    import dsexport.exporter.emit as emit

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(emit.DecoderEmitter, "attention", interrupt)
    from dsexport.build import BuildConfig, build_bundle

    with pytest.raises(KeyboardInterrupt):
        build_bundle(BuildConfig(artifacts.checkpoint("v3_noaux_tc"), tmp_path / "b"))
    assert list(tmp_path.iterdir()) == []


def test_a_leftover_partial_directory_is_not_a_bundle(tmp_path, run_cli):
    partial = tmp_path / ".b.partial-x1"
    partial.mkdir()
    (partial / "model.onnx").write_bytes(b"")
    code, _, err = run_cli("run", partial, "--prompt", "x")
    assert_clean_error(code, err, 4, "a build that did not finish")


@pytest.mark.parametrize("damage, code, words", [
    (lambda d: (d / "config.json").unlink(), 3, "config.json: not found"),
    (lambda d: (d / "config.json").write_text("{"), 3, "not valid JSON"),
    (lambda d: (d / "model.safetensors").write_bytes(b"garbage"), 3, "not a readable safetensors file"),
    (lambda d: (d / "model.safetensors").unlink(), 3, "no *.safetensors files"),
    (lambda d: (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()),
                                                          "model_type": "qwen3_moe"})), 3, "supported model types: deepseek_v2, deepseek_v3"),
])
def test_bad_checkpoints_are_one_line_errors(artifacts, tmp_path, run_cli, damage, code, words):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(artifacts.checkpoint("v3_noaux_tc"), ckpt)
    damage(ckpt)
    got, _, err = run_cli("build", "--model", ckpt, "--out", tmp_path / "out")
    assert_clean_error(got, err, code, words)
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_wrong_tensor_shape_is_a_one_line_error(artifacts, tmp_path, run_cli):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(artifacts.checkpoint("v3_noaux_tc"), ckpt)
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["model.layers.2.mlp.experts.3.up_proj.weight"] = tensors["model.layers.2.mlp.experts.3.up_proj.weight"][:, :5].contiguous()
    save_file(tensors, str(ckpt / "model.safetensors"))
    code, _, err = run_cli("build", "--model", ckpt, "--out", tmp_path / "out")
    assert_clean_error(code, err, 3, "'model.layers.2.mlp.experts.3.up_proj.weight' has shape [32, 5], expected [32, 64]")
    assert not [p for p in tmp_path.iterdir() if p.name != "ckpt"]


def test_unknown_target_lists_the_valid_ones(artifacts, tmp_path, run_cli):
    code, _, err = run_cli("build", "--model", artifacts.checkpoint("v3_noaux_tc"), "--out",
                       tmp_path / "o", "--target", "jetson-nano-9000")
    assert_clean_error(code, err, 2, "unknown target 'jetson-nano-9000'; available targets: android-arm64, arm64-cpu")
    assert "jetson-orin-nano-8gb" in err and "x86-cpu" in err


def test_modified_bundle_file_is_detected(bundle, tmp_path, run_cli):
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    with open(copy / "model.onnx.data", "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))
    code, _, err = run_cli("run", copy, "--prompt", "x")
    assert_clean_error(code, err, 4, "sha256 does not match the manifest")


def test_prompt_longer_than_the_context_is_a_one_line_error(bundle, run_cli):
    code, _, err = run_cli("run", bundle, "--prompt", "The quick brown fox jumps over the lazy dog",
                       "--max-context", 4)
    assert_clean_error(code, err, 5, "the context holds 4")


def test_bad_flag_values_are_one_line_errors(bundle, run_cli):
    code, _, err = run_cli("run", bundle, "--prompt", "x", "--top-p", 0)
    assert_clean_error(code, err, 2, "top_p must be in (0, 1]")
