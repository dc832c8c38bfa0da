"""Expert paging: a paged bundle (segment graphs + expert store) against the fused-op bundle, and
the expert cache at budgets small enough that experts are evicted and read again."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dsexport.core.errors import UserError

PROMPT = list(range(3, 30))


def paged_bundle(artifacts, variant: str):
    from dsexport.build import BuildConfig, build_bundle

    path = artifacts.root / f"paged_{variant}"
    if not (path / "manifest.json").is_file():
        build_bundle(BuildConfig(artifacts.checkpoint(variant), path, paged=True))
    return path


def teacher_forced_logits(engine, ids: list[int], steps: list[int]) -> np.ndarray:
    """Prefill `ids`, then decode `steps` one at a time: logits of every position [T + len(steps), V]."""
    T = len(ids)
    mask = np.ones((1, T), np.int64)
    logits, cache = engine.forward(np.array([ids]), np.arange(T)[None], mask, engine.empty_cache(1))
    out = [logits[0]]
    for n, token in enumerate(steps):
        mask = np.ones((1, T + n + 1), np.int64)
        logits, cache = engine.forward(np.array([[token]]), np.array([[T + n]]), mask, cache)
        out.append(logits[0])
    return np.concatenate(out)


def use_kernel(monkeypatch, kernel: str) -> None:
    """Routed experts by the native kernel (runtime/native/experts.c) or by numpy."""
    from dsexport.runtime import native

    if kernel == "native" and native.load() is None:
        pytest.skip(f"native expert kernel unavailable: {native.status()['reason']}")
    monkeypatch.setenv(native.ENV, kernel)


def check_kernel(engine, kernel: str) -> None:
    assert (engine.backend.kernel is not None) == (kernel == "native")


@pytest.mark.parametrize("kernel", ["native", "numpy"])
@pytest.mark.parametrize("variant", ["v3_noaux_tc", "v2_greedy"])
def test_paged_bundle_matches_the_fused_bundle_within_parity_tolerance(artifacts, variant, kernel, monkeypatch):
    from dsexport.runtime import Engine

    use_kernel(monkeypatch, kernel)
    monkeypatch.setenv("DSEXPORT_DECODER", "onnxruntime")  # the reference: the fused graph in ONNX Runtime
    fused = Engine.load(artifacts.export(variant), verify=False)
    monkeypatch.delenv("DSEXPORT_DECODER")
    paged = Engine.load(paged_bundle(artifacts, variant), verify=False)
    check_kernel(paged, kernel)
    manifest = paged.manifest.to_json()
    assert manifest["graphs"]["decoder"]["paged"] and manifest["export"]["moe_lowering"] == "paged"
    assert not (paged.directory / "model.onnx").exists()
    steps = fused.generate(PROMPT, max_new_tokens=24, ignore_eos=True).output_ids
    a, b = teacher_forced_logits(fused, PROMPT, steps), teacher_forced_logits(paged, PROMPT, steps)
    assert np.abs(a - b).max() <= 1e-4  # docs/parity.md: fp32 tolerance
    assert paged.generate(PROMPT, max_new_tokens=24, ignore_eos=True).output_ids == steps


def test_every_budget_policy_and_prefetch_setting_gives_the_same_tokens(artifacts):
    from dsexport.runtime import Engine

    path = paged_bundle(artifacts, "v3_noaux_tc")
    paging = json.loads((path / "manifest.json").read_text())["paging"]
    expert = max(layer["record_bytes"] for layer in paging["layers"].values())
    total = paging["routed_expert_bytes"]
    resident = Engine.load(path, verify=False).generate(PROMPT, max_new_tokens=32, ignore_eos=True)
    assert resident.paging_stats["bytes_read"] <= total  # all resident: each expert read once, at most
    k = 3  # the variant's top-k
    for mb, policy, prefetch in [(k * expert, "lru", False), (k * expert, "lfu", True), (total / 4, "lru", True),
                                 (total / 4, "lfu", False)]:
        engine = Engine.load(path, verify=False, expert_cache_mb=mb / 2**20, cache_policy=policy, prefetch=prefetch)
        result = engine.generate(PROMPT, max_new_tokens=32, ignore_eos=True)
        assert result.output_ids == resident.output_ids, (mb, policy, prefetch)
        s = result.paging_stats
        assert s["policy"] == policy and s["budget_bytes"] == int(mb)
        assert s["resident_bytes"] <= s["budget_bytes"]
        assert s["bytes_read"] > total * 0.5 if mb > k * expert else s["bytes_read"] > total  # evictions, rereads
        for phase in ("prefill", "decode"):
            p = s[phase]
            # every request is a hit, a read of its own, or a wait on its prefetch
            assert p["hits"] + p["loads"] <= p["requests"] <= p["hits"] + p["loads"] + s["prefetches"]["late"]
        requests = s["prefill"]["requests"] + s["decode"]["requests"]
        assert sum(sum(h) for h in s["expert_histograms"].values()) == requests
        assert s["decode"]["tokens"] == 31 and 0 <= s["hit_rate"] < 1
        if not prefetch:
            assert s["prefetches"]["issued"] == 0
        reads = s["prefill"]["loads"] + s["decode"]["loads"] + s["prefetches"]["loaded"]
        assert s["bytes_read"] == reads * expert


def test_bad_cache_settings_are_user_errors(artifacts):
    from dsexport.runtime import Engine

    path = paged_bundle(artifacts, "v3_noaux_tc")
    with pytest.raises(UserError, match="too small"):
        Engine.load(path, verify=False, expert_cache_mb=0.01)
    with pytest.raises(UserError, match="cache policy"):
        Engine.load(path, verify=False, cache_policy="fifo")
    with pytest.raises(UserError, match="not a paged bundle"):
        Engine.load(artifacts.export("v3_noaux_tc"), verify=False, expert_cache_mb=64)


def test_plan_and_build_say_where_a_backend_cannot_page(artifacts, run_cli, tmp_path):
    code, out, _ = run_cli("plan", "--target", "jetson-orin-nano-8gb")
    assert code == 0 and "TensorRT engines cannot page" in out
    code, _, err = run_cli("build", "--model", artifacts.checkpoint("v3_noaux_tc"), "--target", "jetson-orin-nano-8gb",
                           "--out", tmp_path / "b", "--paged")
    assert code != 0 and "TensorRT engines cannot page" in err and "Traceback" not in err


def test_a_target_too_small_for_every_expert_gets_a_paged_bundle_by_default(artifacts, monkeypatch, tmp_path):
    """An ONNX Runtime target whose memory holds the model without its routed experts."""
    import dataclasses

    from dsexport.build import BuildConfig, build_bundle
    from dsexport.core.config import load_config
    from dsexport.targets import registry
    from dsexport.targets.memory_plan import paging_plan, plan_memory

    ckpt = artifacts.checkpoint("v3_noaux_tc")
    cfg = load_config(ckpt)
    base = registry.TARGETS["x86-cpu"]
    probe = plan_memory(cfg, dataclasses.replace(base, device=registry.Device(1, 1, 10)), "fp32", 64)
    paging = paging_plan(cfg, base, probe)
    usable = (probe.total_bytes - paging["store_bytes"] + 2 * paging["min_cache_bytes"]) / 1e9
    small = dataclasses.replace(base, name="tiny-cpu", device=registry.Device(1, usable, 10), context_default=64)
    monkeypatch.setitem(registry.TARGETS, "tiny-cpu", small)
    result = build_bundle(BuildConfig(ckpt, tmp_path / "b", target="tiny-cpu"))
    m = result.manifest.to_json()
    assert m["graphs"]["decoder"]["paged"] and m["memory_plan"]["paging"]["chosen"]
    assert m["paging"]["default_cache_mb"] * 2**20 == pytest.approx(2 * paging["min_cache_bytes"], rel=0.01)


def test_cli_run_prints_paging_stats(artifacts, run_cli):
    path = paged_bundle(artifacts, "v3_noaux_tc")
    paging = json.loads((path / "manifest.json").read_text())["paging"]
    mb = paging["routed_expert_bytes"] / 4 / 2**20
    code, out, err = run_cli("run", path, "--prompt", "hello", "--max-new-tokens", "8", "--expert-cache-mb", mb,
                             "--stats", "--cache-policy", "lru")
    assert code == 0 and "decode hit rate" in err and "per decoded token" in err and "lru" in err
    assert "routed experts: native" in err or "routed experts: numpy" in err
    assert "decoder: " in err
    code, out, _ = run_cli("run", path, "--prompt", "hello", "--max-new-tokens", "4", "--json", "--stats",
                           "--no-prefetch", "--no-verify")
    stats = json.loads(out)["paging_stats"]
    assert code == 0 and stats["prefetch"] is False
    from dsexport.runtime import native
    # all experts resident: the native decoder runs the step (docs/native.md), else the segments
    assert stats["routed_experts"].startswith("native decoder" if native.load() is not None else "numpy")
    code, _, err = run_cli("run", path, "--prompt", "hello", "--expert-cache-mb", "0.001")
    assert code != 0 and "too small" in err and "Traceback" not in err


def quantized_bundles(artifacts, activations: str, paged: bool):
    """int4 bundles of v3_noaux_tc: the paged one stores its routed experts at int4."""
    from dsexport.build import BuildConfig, build_bundle

    path = artifacts.root / f"int4_{activations}_{'paged' if paged else 'fused'}"
    if not (path / "manifest.json").is_file():
        build_bundle(BuildConfig(artifacts.checkpoint("v3_noaux_tc"), path, paged=paged, precision="int4",
                                 activations=activations))
    return path


@pytest.mark.parametrize("kernel", ["native", "numpy"])
@pytest.mark.parametrize("activations", ["fp32", "int8"])
def test_int4_paged_bundle_matches_the_fused_int4_bundle(artifacts, activations, kernel, monkeypatch):
    """The store holds int4 records; the runtime computes with them (the native kernel in place,
    numpy by dequantizing) and, with int8 activations, quantizes the expert input and SwiGLU
    output as the fused QMoE does."""
    from dsexport.runtime import Engine

    use_kernel(monkeypatch, kernel)
    monkeypatch.setenv("DSEXPORT_DECODER", "onnxruntime")  # the reference: the fused graph's QMoE in ONNX Runtime
    fused = Engine.load(quantized_bundles(artifacts, activations, paged=False), verify=False)
    monkeypatch.delenv("DSEXPORT_DECODER")
    paged = Engine.load(quantized_bundles(artifacts, activations, paged=True), verify=False)
    check_kernel(paged, kernel)
    p = paged.manifest.to_json()["paging"]
    assert (p["precision"], p["bits"], p["block"], p["scheme"], p["activations"]) == ("int4", 4, 32, "absmax",
                                                                                      activations)
    steps = fused.generate(PROMPT, max_new_tokens=24, ignore_eos=True).output_ids
    per_position = np.abs(teacher_forced_logits(fused, PROMPT, steps) - teacher_forced_logits(paged, PROMPT, steps)).max(-1)
    if activations == "fp32":  # docs/quantization.md: int4 without activation quantization, 1e-3 everywhere
        assert per_position.max() <= 1e-3
        assert paged.generate(PROMPT, max_new_tokens=24, ignore_eos=True).output_ids == steps
    else:  # a rare int8 rounding tie may flip: tight at the median (tests/test_quantize.py)
        assert np.median(per_position) <= 1e-4 and per_position.max() <= 0.25


def test_int4_store_reads_a_fraction_of_the_fp32_bytes_and_evictions_keep_the_tokens(artifacts, monkeypatch):
    from dsexport.runtime import Engine

    path = quantized_bundles(artifacts, "int8", paged=True)
    paging = json.loads((path / "manifest.json").read_text())["paging"]
    fp32 = json.loads((paged_bundle(artifacts, "v3_noaux_tc") / "manifest.json").read_text())["paging"]
    layer = next(iter(paging["layers"]))
    record, fp32_record = paging["layers"][layer]["record_bytes"], fp32["layers"][layer]["record_bytes"]
    assert record / fp32_record == (0.5 + 4 / 32) / 4  # 4-bit weights + a float32 scale per 32
    resident = Engine.load(path, verify=False).generate(PROMPT, max_new_tokens=24, ignore_eos=True)
    k = 3
    for mb, policy, prefetch, holds in [(k * record, "lfu", True, "quantized"), (paging["routed_expert_bytes"] / 4,
                                        "lru", False, "quantized"), (k * fp32_record, "lfu", False, "fp32")]:
        monkeypatch.setenv("DSEXPORT_EXPERT_CACHE_HOLDS", holds)
        engine = Engine.load(path, verify=False, expert_cache_mb=mb / 2**20, cache_policy=policy, prefetch=prefetch)
        result = engine.generate(PROMPT, max_new_tokens=24, ignore_eos=True)
        assert result.output_ids == resident.output_ids, (mb, policy, prefetch, holds)
        s = result.paging_stats
        assert s["store_precision"] == "int4" and s["cache_holds"] == holds
        assert s["resident_bytes"] <= s["budget_bytes"]
        reads = s["prefill"]["loads"] + s["decode"]["loads"] + s["prefetches"]["loaded"]
        assert reads > 0 and s["bytes_read"] == reads * record  # reads cost the int4 record, whatever is held
    # the same routing at fp32 reads 6.4x the bytes: compare per expert read at the k-expert budget
    fp32_run = Engine.load(paged_bundle(artifacts, "v3_noaux_tc"), verify=False, expert_cache_mb=k * fp32_record / 2**20,
                           prefetch=False).generate(PROMPT, max_new_tokens=24, ignore_eos=True).paging_stats
    per_load = fp32_run["decode"]["bytes_read"] / fp32_run["decode"]["loads"]
    assert per_load == fp32_record and record / per_load < 1 / 6


def test_per_expert_widths_are_refused_for_a_paged_store(tmp_path):
    from dsexport.exporter.export import ExportConfig
    from dsexport.exporter.paged import export_paged
    from dsexport.exporter.quantize import QuantConfig

    quant = QuantConfig({"routed_experts": 4}, expert_bits={1: {0: 8}})
    with pytest.raises(UserError, match="--expert-bits"):
        export_paged(None, tmp_path, ExportConfig(quant=quant), lambda *a: None)


def test_a_board_whose_memory_cannot_hold_v2_lite_plans_a_paged_bundle(run_cli, tmp_path):
    """DeepSeek-V2-Lite's configuration at int4 on a Raspberry Pi 5 8GB: the plan says it does
    not fit whole and that paging (the default there) leaves a cache smaller than the store."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "v2lite", Path(__file__).resolve().parents[1] / "benchmarks" / "make_checkpoint_v2lite.py")
    v2lite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(v2lite)
    (tmp_path / "config.json").write_text(json.dumps(v2lite.V2_LITE))
    code, out, err = run_cli("plan", "--target", "raspberry-pi-5-8gb", "--model", tmp_path, "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["fits"] is False and plan["precision"] == "int4"
    paging = plan["paging"]
    assert paging["fits"] and 0 < paging["cache_bytes"] < paging["store_bytes"]


def test_segment_outputs_that_disagree_with_the_store_are_refused(artifacts, monkeypatch):
    """The kernel indexes expert records by the segment graph's shapes and slots: a bundle whose
    graph and store disagree is refused before any expert is read."""
    from dsexport.core.errors import BundleError
    from dsexport.runtime import Engine

    monkeypatch.setenv("DSEXPORT_DECODER", "onnxruntime")  # the segments' path
    backend = Engine.load(paged_bundle(artifacts, "v3_noaux_tc"), verify=False).backend
    layer = next(iter(backend.cache.store.layers))
    entry = backend.cache.store.layers[layer]
    h = np.zeros((2, entry.hidden), np.float32)
    ids, weights = np.zeros((2, 3), np.int64), np.zeros((2, 3), np.float32)
    backend._check_segment_outputs(layer, h, ids, weights, h.reshape(1, 2, -1))  # consistent: passes
    with pytest.raises(BundleError, match="hidden size"):
        backend._check_segment_outputs(layer, np.zeros((2, entry.hidden + 32), np.float32), ids, weights, h)
    for bad in (-1, entry.experts):
        with pytest.raises(BundleError, match="outside"):
            backend._check_segment_outputs(layer, h, np.full((2, 3), bad), weights, h)
