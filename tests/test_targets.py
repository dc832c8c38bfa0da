"""Device profiles and memory-fit planning (arithmetic checked on DeepSeek-V2-Lite's config)."""

from __future__ import annotations

import json

import pytest

from dsexport.core.config import parameter_counts, parse_config
from dsexport.targets import TARGETS, get_target
from dsexport.targets.memory_plan import BYTES_PER_WEIGHT, plan_memory, suggestions

V2_LITE = {"model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
           "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16, "n_shared_experts": 2,
           "n_routed_experts": 64, "num_experts_per_tok": 6, "kv_lora_rank": 512, "q_lora_rank": None,
           "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "greedy",
           "first_k_dense_replace": 1, "rope_theta": 10000, "max_position_embeddings": 163840}


def test_v2_lite_parameter_counts_match_deepseeks_figures():
    total, active = parameter_counts(parse_config(V2_LITE))
    # DeepSeek: "15.7B total, 2.4B activated". Ours read per token: 2.45B (output head in, embedding table out).
    assert round(total / 1e9, 1) == 15.7 and 2.4e9 <= active <= 2.5e9


def test_every_listed_jetson_profile_exists_with_checked_facts():
    names = {"jetson-orin-nano-4gb", "jetson-orin-nano-8gb", "jetson-orin-nx-8gb", "jetson-orin-nx-16gb",
             "jetson-agx-orin-32gb", "jetson-agx-orin-64gb", "jetson-thor"}
    assert names <= set(TARGETS)
    nano = get_target("jetson-orin-nano-8gb")
    assert nano.device.bandwidth_gbs == 68 and nano.device.compute_capability == "8.7" and "10.3" in nano.device.tensorrt
    assert get_target("jetson").name == get_target("jetson-orin-nano").name == "jetson-orin-nano-8gb"
    assert "fp8" not in nano.precisions and "fp8" in get_target("jetson-thor").precisions  # Orin has no FP8


def test_plan_arithmetic():
    cfg = parse_config(V2_LITE)
    total, active = parameter_counts(cfg)
    plan = plan_memory(cfg, get_target("jetson-agx-orin-64gb"), "fp16", 4096)
    assert plan.weights_bytes == int(total * 2) and plan.kv_cache_bytes == 576 * 27 * 4096 * 2
    assert plan.decode_bytes_per_token == int(active * 2)
    assert plan.fits and plan.margin_bytes == plan.usable_bytes - plan.total_bytes
    est = plan.decode_estimate()
    assert est["roofline_tokens_per_s"] == pytest.approx(204.8e9 / (active * 2)) and "estimate" in est["label"]


def test_a_plan_that_does_not_fit_says_what_would():
    cfg = parse_config(V2_LITE)
    nano = get_target("jetson-orin-nano-8gb")
    fp16 = plan_memory(cfg, nano, "fp16", 4096)
    assert fp16.fits is False
    assert any("pruning" in s for s in suggestions(cfg, nano, fp16))
    agx = get_target("jetson-agx-orin-32gb")
    assert any(s.startswith("--precision int8") for s in suggestions(cfg, agx, plan_memory(cfg, agx, "fp16", 4096)))
    assert BYTES_PER_WEIGHT["int4"] < BYTES_PER_WEIGHT["int8"] < BYTES_PER_WEIGHT["fp16"]


def test_plan_cli_json(run_cli, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(V2_LITE))
    code, out, _ = run_cli("plan", "--model", tmp_path, "--target", "jetson-orin-nano-8gb", "--json")
    plan = json.loads(out)
    assert code == 0 and plan["fits"] is False and plan["suggestions"] and plan["precision"] == "fp16"


def test_a_build_that_cannot_fit_stops_with_the_plan_unless_forced(run_cli, tmp_path, monkeypatch):
    from dsexport.targets.registry import Device, Target

    board = Target("test-board-64mb", "a board too small for the embedded model", "onnxruntime",
                   ("CPUExecutionProvider",), "ort-moe", ("fp32",), "fp32", device=Device(0.064, 0.032, 10.0))
    monkeypatch.setitem(TARGETS, board.name, board)
    code, _, err = run_cli("build", "--target", board.name, "--out", tmp_path / "b")
    assert code == 2 and "does not fit test-board-64mb" in err and "--force" in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()
    code, _, err = run_cli("build", "--target", board.name, "--out", tmp_path / "b", "--force")
    assert code == 0 and (tmp_path / "b" / "manifest.json").is_file()
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["memory_plan"]["fits"] is False


def test_jetson_alias_says_which_board_it_resolved_to(run_cli, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(V2_LITE))
    code, _, err = run_cli("plan", "--model", tmp_path, "--target", "jetson")
    assert code == 0 and "--target jetson resolved to jetson-orin-nano-8gb" in err


@pytest.mark.parametrize("model, mem_gib, expected", [
    ("NVIDIA Jetson Orin Nano Developer Kit\x00", 7.4, "jetson-orin-nano-8gb"),
    ("NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super", 7.4, "jetson-orin-nano-8gb"),
    ("NVIDIA Jetson Orin Nano 4GB", 3.4, "jetson-orin-nano-4gb"),
    ("NVIDIA Jetson Orin NX Engineering Reference Developer Kit", 15.3, "jetson-orin-nx-16gb"),
    ("NVIDIA Jetson Orin NX 8GB", 7.3, "jetson-orin-nx-8gb"),
    ("Jetson AGX Orin Developer Kit", 30.6, "jetson-agx-orin-32gb"),
    ("Jetson AGX Orin Developer Kit", 61.4, "jetson-agx-orin-64gb"),
    ("NVIDIA Jetson AGX Thor Developer Kit", 122.8, "jetson-thor"),
    ("Raspberry Pi 5 Model B Rev 1.0", 7.9, None),
])
def test_jetson_board_detection(model, mem_gib, expected):
    from dsexport.targets.jetson import detect_board

    assert detect_board(model, int(mem_gib * 2**30)) == expected


def test_every_issue_profile_exists():
    names = {"x86-cpu", "arm64-cpu", "cuda-gpu", "jetson-orin-nano-4gb", "jetson-orin-nano-8gb", "jetson-orin-nx-8gb",
             "jetson-orin-nx-16gb", "jetson-agx-orin-32gb", "jetson-agx-orin-64gb", "jetson-thor"}
    assert names <= set(TARGETS)
    for name in names:
        t = TARGETS[name]
        if t.backend == "tensorrt":
            assert t.moe_lowering == "gather" and t.prefill_moe_lowering == "dense" and t.tensorrt_default


def test_phone_plans_know_the_ort_format_cap():
    cfg = parse_config(V2_LITE)
    phone = get_target("android-arm64")
    for precision in ("fp32", "int4"):  # V2-Lite's int4 weights (8.8 GB) are still over the 2 GiB flatbuffer
        plan = plan_memory(cfg, phone, precision, 4096)
        assert plan.fits is False and plan.format_limit_bytes == 2**31 - 1
        assert any("model-file cap" in s for s in suggestions(cfg, phone, plan))
    small = parse_config({**V2_LITE, "num_hidden_layers": 2, "n_routed_experts": 8, "vocab_size": 32000})
    assert plan_memory(small, phone, "fp32", 4096).fits
