"""The native decoder (runtime/native/decoder.c): a CPU bundle's whole step in C, against the
same bundle's graphs in ONNX Runtime (a paged bundle's segments, a fused bundle's one graph) and
against transformers, and what it refuses."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from dsexport.core.errors import BundleError

from test_paging import PROMPT, paged_bundle, quantized_bundles, teacher_forced_logits


@pytest.fixture(autouse=True)
def kernel_library():
    from dsexport.runtime import native

    if native.load() is None:
        pytest.skip(f"native kernel library unavailable: {native.status()['reason']}")


def load(path, decoder: str, monkeypatch, **kw):
    """The bundle run by the native decoder, or by ONNX Runtime (a paged bundle's segments, a fused
    bundle's graph)."""
    from dsexport.runtime import Engine

    monkeypatch.setenv("DSEXPORT_DECODER", decoder)
    engine = Engine.load(path, verify=False, **kw)
    graphs = "onnxruntime-paged" if engine.manifest.is_paged else "onnxruntime"
    assert engine.backend.name == ("native" if decoder == "native" else graphs)
    return engine


@pytest.mark.parametrize("variant", ["v3_noaux_tc", "v2_greedy", "v2_group_limited", "v3_flat_tied"])
def test_native_decoder_matches_the_segments_and_the_oracle_at_fp32(artifacts, variant, monkeypatch):
    """docs/parity.md's fp32 tolerance (1e-4) against the segments, teacher-forced over a prefill
    and 24 cached steps; free-running greedy tokens equal to transformers' generate."""
    matches_onnxruntime_and_the_oracle(artifacts, paged_bundle(artifacts, variant), variant, monkeypatch)


def matches_onnxruntime_and_the_oracle(artifacts, path, variant: str, monkeypatch) -> None:
    """Native against ONNX Runtime on the same bundle within docs/parity.md's fp32 tolerance (1e-4),
    teacher-forced over a prefill and 24 cached steps; free-running greedy tokens equal to
    transformers' generate."""
    import torch

    graphs, nat = load(path, "onnxruntime", monkeypatch), load(path, "native", monkeypatch)
    assert not any(ly.w_half for ly in nat.backend.layers)  # fp32 bundles keep their absorbed weights
    steps = graphs.generate(PROMPT, max_new_tokens=24, ignore_eos=True).output_ids
    diff = np.abs(teacher_forced_logits(graphs, PROMPT, steps) - teacher_forced_logits(nat, PROMPT, steps))
    assert diff.max() <= 1e-4
    hf = artifacts.hf_model(variant)
    with torch.no_grad():
        want = hf.generate(torch.tensor([PROMPT]), max_new_tokens=24, do_sample=False, min_new_tokens=24)[0, len(PROMPT):]
    assert nat.generate(PROMPT, max_new_tokens=24, ignore_eos=True).output_ids == want.tolist()


@pytest.mark.parametrize("activations", ["fp32", "int8"])
def test_native_decoder_matches_the_segments_on_int4_bundles(artifacts, activations, monkeypatch):
    """Same int4 rows, same int8 activation rounding (MatMulNBits accuracy_level 4, QMoE): the
    tolerance of docs/quantization.md, and the same greedy tokens."""
    path = quantized_bundles(artifacts, activations, paged=True)
    matches_onnxruntime_quantized(path, activations, monkeypatch)


def matches_onnxruntime_quantized(path, activations: str, monkeypatch) -> None:
    """Native against ONNX Runtime on the same quantized bundle, teacher-forced, at the tolerance of
    docs/quantization.md (1e-3 with fp32 activations; median 1e-4, max 0.25 for an int8 rounding
    tie), and the same greedy tokens."""
    graphs, nat = load(path, "onnxruntime", monkeypatch), load(path, "native", monkeypatch)
    steps = graphs.generate(PROMPT, max_new_tokens=24, ignore_eos=True).output_ids
    per_position = np.abs(teacher_forced_logits(graphs, PROMPT, steps) - teacher_forced_logits(nat, PROMPT, steps)).max(-1)
    if activations == "fp32":
        assert per_position.max() <= 1e-3
    else:  # a rare int8 rounding tie may flip one quantized activation
        assert np.median(per_position) <= 1e-4 and per_position.max() <= 0.25
    assert nat.generate(PROMPT, max_new_tokens=24, ignore_eos=True).output_ids == steps


def test_long_prompts_chunked_prefill_and_cache_growth(artifacts, monkeypatch):
    """A 150-token prompt outgrows the cache's first buffers (64 positions); prefilled in chunks of
    40 it gives the logits of one prefill, and the segments' logits."""
    path = paged_bundle(artifacts, "v3_noaux_tc")
    nat, segments = load(path, "native", monkeypatch), load(path, "onnxruntime", monkeypatch)
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, 200, 150)]
    whole = nat.generate(prompt, max_new_tokens=12, ignore_eos=True)
    nat.prefill_chunk = 40
    chunked = nat.generate(prompt, max_new_tokens=12, ignore_eos=True)
    assert whole.output_ids == chunked.output_ids
    diff = np.abs(teacher_forced_logits(segments, prompt, whole.output_ids) - teacher_forced_logits(nat, prompt, whole.output_ids))
    assert diff.max() <= 1e-4


def test_batched_rows_with_left_padding_equal_each_row_alone(artifacts, monkeypatch):
    path = paged_bundle(artifacts, "v2_group_limited")
    nat = load(path, "native", monkeypatch)
    prompts = [PROMPT, PROMPT[:5], PROMPT[3:20]]
    alone = [nat.generate(p, max_new_tokens=10, ignore_eos=True).output_ids for p in prompts]
    batched = nat.generate_batch(prompts, max_new_tokens=10, ignore_eos=True)
    assert [r.output_ids for r in batched] == alone


def test_native_is_the_default_and_says_why_when_the_segments_run(artifacts, monkeypatch, run_cli):
    from dsexport.runtime import Engine

    monkeypatch.delenv("DSEXPORT_DECODER", raising=False)
    path = paged_bundle(artifacts, "v3_noaux_tc")
    code, out, _ = run_cli("inspect", path, "--json")
    assert code == 0 and json.loads(out)["native_decoder"] is True
    code, out, _ = run_cli("inspect", artifacts.export("v3_noaux_tc", lowering="gather"), "--json")
    assert code == 0 and json.loads(out)["native_decoder"] is False  # the gather lowering's weights: not read
    engine = Engine.load(path, verify=False)
    assert engine.backend.name == "native"
    stats = engine.generate(PROMPT, max_new_tokens=4, ignore_eos=True).paging_stats
    assert stats["decoder"] == "native" and stats["decode"]["tokens"] == 3 and stats["hit_rate"] == 1.0
    # a budget below every expert pages: the segments run, and the stats say why
    paging = json.loads((path / "manifest.json").read_text())["paging"]
    small = Engine.load(path, verify=False, expert_cache_mb=paging["routed_expert_bytes"] / 2 / 2**20)
    assert small.backend.name == "onnxruntime-paged"
    reason = small.generate(PROMPT, max_new_tokens=2, ignore_eos=True).paging_stats["decoder"]
    assert "does not hold every expert" in reason


def test_a_store_with_zero_points_gets_no_native_section_and_runs_the_segments(artifacts, tmp_path, monkeypatch):
    from dsexport.build import BuildConfig, build_bundle
    from dsexport.runtime import Engine

    out = tmp_path / "asym"
    build_bundle(BuildConfig(artifacts.checkpoint("v3_noaux_tc"), out, paged=True, precision="int4",
                             zero_points=True))
    manifest = json.loads((out / "manifest.json").read_text())
    assert "native" not in manifest
    monkeypatch.delenv("DSEXPORT_DECODER", raising=False)
    engine = Engine.load(out, verify=False)
    assert engine.backend.name == "onnxruntime-paged"
    assert "no native section" in engine.generate(PROMPT, max_new_tokens=2).paging_stats["decoder"]


def tampered(artifacts, tmp_path, edit) -> "Path":  # noqa: F821
    out = tmp_path / "bundle"
    shutil.copytree(paged_bundle(artifacts, "v3_noaux_tc"), out)
    manifest = json.loads((out / "manifest.json").read_text())
    edit(manifest["native"])
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.mark.parametrize("edit, message", [
    (lambda n: n["globals"]["embed"].update(offset=1 << 40), "lies outside it"),
    (lambda n: n["layers"]["1"]["o_proj"].update(rows=7), "expected"),
    (lambda n: n["layers"]["0"]["w_uk"].update(shape=[1, 2, 3]), "bytes for a float32 tensor"),
    (lambda n: n["globals"]["embed"].update(file="../../etc/passwd"), "not a path inside the bundle"),
    (lambda n: n["layers"].pop("2"), "not every layer"),
    (lambda n: n["globals"]["embed"].update(file="segment_99.onnx.data"), "segment_99"),
    (lambda n: n["layers"]["1"]["qkv"].update(bits=3), "bits"),
    (lambda n: n["globals"]["head"].update(col_start=1 << 20), "cannot hold|packed"),
])
def test_a_native_section_that_lies_is_refused_before_anything_runs(artifacts, tmp_path, edit, message, monkeypatch):
    from dsexport.runtime import Engine

    monkeypatch.delenv("DSEXPORT_DECODER", raising=False)
    path = tampered(artifacts, tmp_path, edit)
    with pytest.raises(BundleError, match=message):
        Engine.load(path, verify=False)


def test_cli_reports_a_lying_native_section_in_one_line(artifacts, tmp_path, run_cli):
    path = tampered(artifacts, tmp_path, lambda n: n["globals"]["embed"].update(offset=1 << 40))
    code, out, err = run_cli("run", path, "--prompt", "hi", "--max-new-tokens", "2", "--no-verify")
    assert code != 0 and "Traceback" not in err and "lies outside it" in err


def test_runtime_native_backend_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; import dsexport.runtime.native_backend, dsexport.runtime.backends; "
            "assert 'torch' not in sys.modules and 'dsexport.exporter' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("paged", [True, False])
@pytest.mark.parametrize("variant", ["v3_noaux_tc", "v2_group_limited"])
def test_pruned_layers_with_uneven_and_empty_groups_route_as_the_segments_do(artifacts, tmp_path, variant, paged,
                                                                             monkeypatch):
    """Per-layer expert counts (tests/test_expert_counts.py's plans): groups of different sizes
    and empty groups, the routing's hardest case; the chosen experts and logits agree with ONNX
    Runtime on the same bundle, paged (the segments) or fused (the graph)."""
    from dsexport.build import BuildConfig, build_bundle

    from test_expert_counts import PLANS

    out = tmp_path / "pruned"
    build_bundle(BuildConfig(artifacts.checkpoint(variant), out, kept_experts=PLANS[variant], paged=paged))
    segments = load(out, "onnxruntime", monkeypatch)
    nat = load(out, "native", monkeypatch)
    steps = segments.generate(PROMPT, max_new_tokens=16, ignore_eos=True).output_ids
    diff = np.abs(teacher_forced_logits(segments, PROMPT, steps) - teacher_forced_logits(nat, PROMPT, steps))
    assert diff.max() <= 1e-4
    if not paged:
        return
    a = segments.generate(PROMPT, max_new_tokens=16, ignore_eos=True).paging_stats["expert_histograms"]
    b = nat.generate(PROMPT, max_new_tokens=16, ignore_eos=True).paging_stats["expert_histograms"]
    assert a == b  # the same experts, as often, in every layer


def test_portable_build_of_the_decoder_matches_the_segments(artifacts, tmp_path, monkeypatch):
    """The C path Arm builds take (no AVX2 intrinsics, rows instead of panels), built here and
    loaded in place of the installed library."""
    import shutil
    import subprocess
    from pathlib import Path

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the portable decoder")
    src = Path(__file__).resolve().parents[1] / "runtime" / "native"
    lib = tmp_path / "decoder_portable.so"
    subprocess.run([cc, "-O2", "-std=c11", "-pthread", "-shared", "-fPIC", "-DDSX_PORTABLE", str(src / "experts.c"),
                    str(src / "decoder.c"), "-o", str(lib), "-lm"], check=True)
    from dsexport.runtime import native

    monkeypatch.setattr(native, "_lib", None)  # load the portable build instead
    monkeypatch.setenv("DSEXPORT_NATIVE_LIBRARY", str(lib))
    for path, tolerance in ((paged_bundle(artifacts, "v3_noaux_tc"), 1e-4),
                            (quantized_bundles(artifacts, "fp32", paged=True), 1e-3),
                            (quantized_bundles(artifacts, "int8", paged=False), 0.25)):  # int8 rounding ties
        nat = load(path, "native", monkeypatch)
        assert native.status()["simd"] == "portable C" and not nat.backend.panels
        segments = load(path, "onnxruntime", monkeypatch)
        steps = segments.generate(PROMPT, max_new_tokens=12, ignore_eos=True).output_ids
        diff = np.abs(teacher_forced_logits(segments, PROMPT, steps) - teacher_forced_logits(nat, PROMPT, steps))
        assert diff.max() <= tolerance


def build_x86_64_v3(tmp_path):
    """The kernel library built for plain AVX2 (x86-64-v3: FMA, F16C; no VNNI, no AVX-512)."""
    import subprocess
    from pathlib import Path

    cc = shutil.which("cc") or shutil.which("gcc")
    src = Path(__file__).resolve().parents[1] / "runtime" / "native"
    lib = tmp_path / "decoder_avx2.so"
    subprocess.run([cc, "-O3", "-std=c11", "-pthread", "-shared", "-fPIC", "-march=x86-64-v3", str(src / "experts.c"),
                    str(src / "decoder.c"), "-o", str(lib), "-lm"], check=True)
    return lib


def test_the_vnni_build_gives_the_logits_of_the_plain_avx2_build(artifacts, tmp_path, monkeypatch):
    """vpdpbusd replaces maddubs + madd where the compiler targets VNNI: the integer block sums
    are exact either way, so an x86-64-v3 build (AVX2, FMA, F16C, no VNNI) gives the same logits
    bit for bit on int4 and int8 rows (panels, fp16 scales, int8 activations)."""
    from dsexport.runtime import native

    if "VNNI" not in native.status()["simd"]:
        pytest.skip(f"the installed kernel library does not use VNNI here ({native.status()['simd']})")
    lib = build_x86_64_v3(tmp_path)
    from dsexport.build import BuildConfig, build_bundle

    int8_rows = artifacts.root / "fused_int8_int8"  # as test_quantized_fused_bundles_match_the_graph builds it
    if not (int8_rows / "manifest.json").is_file():
        build_bundle(BuildConfig(artifacts.checkpoint("v3_noaux_tc"), int8_rows, precision="int8", activations="int8"))
    for path in (quantized_bundles(artifacts, "int8", paged=False), quantized_bundles(artifacts, "int8", paged=True),
                 int8_rows):
        vnni = load(path, "native", monkeypatch)
        steps = vnni.generate(PROMPT, max_new_tokens=12, ignore_eos=True).output_ids
        with pytest.MonkeyPatch.context() as mp:
            plain, logits = logits_with_library(lib, path, PROMPT, steps, mp)
            assert plain.backend.half
        assert np.array_equal(logits, teacher_forced_logits(vnni, PROMPT, steps))


def logits_with_library(lib, path, prompt, steps, mp):
    """The bundle on another build of the kernel library (an AVX2 one, not VNNI or AVX-512VL):
    the engine and its teacher-forced logits. `mp` undoes the switch when its context ends."""
    from dsexport.runtime import native

    mp.setattr(native, "_lib", None)
    mp.setenv("DSEXPORT_NATIVE_LIBRARY", str(lib))
    engine = load(path, "native", mp)
    assert native.status()["simd"] == "AVX2"
    return engine, teacher_forced_logits(engine, prompt, steps)


def test_fp32_prompt_tiles_do_not_change_the_logits(artifacts, tmp_path):
    """fp32 rows against a prompt run in tiles sized to the vector registers (6 rows x 3-4 tokens
    with AVX-512VL's 32, 2-3 rows with plain AVX2's 16); each output is one accumulator over k
    either way, so an x86-64-v3 build gives the same prompt and decode logits bit for bit."""
    import ctypes

    from dsexport.runtime import native

    lib = native.load()
    if lib is None or getattr(lib, "dsx_vector_registers", None) is None or lib.dsx_vector_registers() != 32:
        pytest.skip("the installed kernel library was not built with 32 vector registers (AVX-512VL) here")
    plain = build_x86_64_v3(tmp_path)
    assert ctypes.CDLL(str(plain)).dsx_vector_registers() == 16
    path = paged_bundle(artifacts, "v3_noaux_tc")
    prompt = PROMPT * 3  # groups of up to 7 tokens, experts with several tokens
    with pytest.MonkeyPatch.context() as mp:
        wide = load(path, "native", mp)
        steps = wide.generate(prompt, max_new_tokens=6, ignore_eos=True).output_ids
        want = teacher_forced_logits(wide, prompt, steps)
        _, logits = logits_with_library(plain, path, prompt, steps, mp)
        assert np.array_equal(logits, want)


def test_a_library_built_from_other_sources_falls_back_to_the_segments(artifacts, monkeypatch):
    """Structures or weight layouts that differ would be read wrongly, not fail: the check at load
    sends the bundle to the segments and says why."""
    from dsexport.runtime import Engine, native_backend

    monkeypatch.delenv("DSEXPORT_DECODER", raising=False)
    monkeypatch.setattr(native_backend, "LAYOUT_VERSION", native_backend.LAYOUT_VERSION + 1)
    engine = Engine.load(paged_bundle(artifacts, "v3_noaux_tc"), verify=False)
    assert engine.backend.name == "onnxruntime-paged"
    assert "reinstall dsexport" in engine.generate(PROMPT, max_new_tokens=2).paging_stats["decoder"]


def test_store_routing_groups_and_routers_are_checked_before_the_decoder_reads_them(artifacts, tmp_path, monkeypatch):
    """The C routing indexes a layer's groups by expert and reads its router: a groups list of the
    wrong length, or a router holding NaN, is refused at load."""
    from dsexport.runtime import Engine

    monkeypatch.delenv("DSEXPORT_DECODER", raising=False)
    out = tmp_path / "bundle"
    shutil.copytree(paged_bundle(artifacts, "v3_noaux_tc"), out)
    manifest = json.loads((out / "manifest.json").read_text())
    good = json.dumps(manifest)
    manifest["paging"]["layers"]["1"]["groups"] = [0]
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="routing groups"):
        Engine.load(out, verify=False)
    (out / "manifest.json").write_text(good)
    layer = json.loads(good)["paging"]["layers"]["1"]
    with open(out / "experts.bin", "r+b") as f:
        f.seek(layer["router"])
        f.write(np.full(4, np.nan, np.float32).tobytes())
    with pytest.raises(BundleError, match="router"):
        Engine.load(out, verify=False)


# ---- fused bundles (the default CPU build): the experts as the MoE / QMoE op holds them ------------

@pytest.mark.parametrize("variant", ["v3_noaux_tc", "v2_greedy", "v2_group_limited", "v3_flat_tied"])
def test_fused_bundles_run_natively_by_default_and_match_the_graph_and_the_oracle(artifacts, variant, monkeypatch):
    """The default x86-cpu bundle (one graph, the fused MoE op in 2 shards, a tied head on
    v3_flat_tied): native by default, within docs/parity.md's fp32 tolerance (1e-4) of ONNX
    Runtime running the graph, and transformers' greedy tokens."""
    from dsexport.runtime import Engine

    path = artifacts.export(variant)
    monkeypatch.delenv("DSEXPORT_DECODER", raising=False)
    assert Engine.load(path, verify=False).backend.name == "native"
    matches_onnxruntime_and_the_oracle(artifacts, path, variant, monkeypatch)


@pytest.mark.parametrize("precision, activations", [("int4", "fp32"), ("int4", "int8"), ("int8", "int8")])
def test_quantized_fused_bundles_match_the_graph(artifacts, precision, activations, monkeypatch):
    """QMoE's packed experts, de-interleaved and un-sharded at load, MatMulNBits projections: the
    tolerance of docs/quantization.md against ONNX Runtime on the same graph, the same greedy tokens."""
    from dsexport.build import BuildConfig, build_bundle

    path = artifacts.root / f"fused_{precision}_{activations}"
    if not (path / "manifest.json").is_file():
        build_bundle(BuildConfig(artifacts.checkpoint("v3_noaux_tc"), path, precision=precision, activations=activations))
    routed = json.loads((path / "manifest.json").read_text())["native"]["layers"]["1"]["routed"]
    assert routed["bits"] == int(precision[3:]) and routed["shards"] >= 1
    matches_onnxruntime_quantized(path, activations, monkeypatch)


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.update(shards=3), "shards|expected"),
    (lambda r: r["fc1"].update(offset=1 << 40), "lies outside it"),
    (lambda r: r["router"].update(shape=[3, 5]), "bytes for a float32|cannot hold"),
    (lambda r: r.update(groups=[0]), "routing groups"),
    (lambda r: r.update(bits=4), "block"),
])
def test_a_fused_native_section_that_lies_is_refused(artifacts, tmp_path, edit, message, monkeypatch):
    from dsexport.runtime import Engine

    out = tmp_path / "bundle"
    shutil.copytree(artifacts.export("v3_noaux_tc"), out)
    manifest = json.loads((out / "manifest.json").read_text())
    edit(manifest["native"]["layers"]["1"]["routed"])
    (out / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.delenv("DSEXPORT_DECODER", raising=False)
    with pytest.raises(BundleError, match=message):
        Engine.load(out, verify=False)


def test_fused_and_paged_sections_must_match_their_decoder(artifacts, tmp_path, monkeypatch):
    """A fused bundle whose MoE layer lacks its routed experts' location (or a paged one that
    claims them) is refused: the decoder would otherwise read experts from nowhere."""
    from dsexport.runtime import Engine

    out = tmp_path / "bundle"
    shutil.copytree(artifacts.export("v3_noaux_tc"), out)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["native"]["layers"]["1"]["routed"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="does not match the fused decoder"):
        Engine.load(out, verify=False)


def test_fused_bundle_runs_onnxruntime_when_asked_or_when_the_library_is_stale(artifacts, monkeypatch, run_cli):
    from dsexport.runtime import Engine, native_backend

    path = artifacts.export("v3_noaux_tc")
    monkeypatch.setenv("DSEXPORT_DECODER", "onnxruntime")
    assert Engine.load(path, verify=False).backend.name == "onnxruntime"
    monkeypatch.delenv("DSEXPORT_DECODER")
    monkeypatch.setattr(native_backend, "LAYOUT_VERSION", native_backend.LAYOUT_VERSION + 1)
    engine = Engine.load(path, verify=False)
    assert engine.backend.name == "onnxruntime" and "reinstall dsexport" in engine.backend.native_unavailable
    monkeypatch.undo()
    code, out, err = run_cli("run", path, "--prompt", "hello", "--max-new-tokens", "3", "--no-verify", "--stats")
    assert code == 0 and "decoder: native" in err


def test_per_expert_widths_get_no_native_section_and_run_onnxruntime(artifacts, tmp_path, monkeypatch):
    """One QMoE per width: not a layout the decoder reads, so the bundle says nothing it cannot back."""
    from dsexport.build import BuildConfig, build_bundle
    from dsexport.runtime import Engine

    out = tmp_path / "mixed"
    widths = {1: {e: 8 if e % 2 else 4 for e in range(16)}}
    build_bundle(BuildConfig(artifacts.checkpoint("v3_noaux_tc"), out, precision="int4", expert_bits=widths))
    assert "native" not in json.loads((out / "manifest.json").read_text())
    monkeypatch.delenv("DSEXPORT_DECODER", raising=False)
    engine = Engine.load(out, verify=False)
    assert engine.backend.name == "onnxruntime" and "no native section" in engine.backend.native_unavailable


@pytest.mark.parametrize("layout", ["fused", "paged"])
def test_weights_larger_than_available_memory_run_onnxruntime_and_say_why(artifacts, monkeypatch, layout):
    """The native decoder reads every weight into memory; where they would not fit (MemAvailable),
    ONNX Runtime runs the graphs instead (a fused graph's weights mapped from the file) and the
    reason names both sizes."""
    from dsexport.runtime import Engine, memory
    from dsexport.runtime.backends import native_resident_bytes

    path = artifacts.export("v3_noaux_tc") if layout == "fused" else paged_bundle(artifacts, "v3_noaux_tc")
    monkeypatch.delenv("DSEXPORT_DECODER", raising=False)
    need = native_resident_bytes(Engine.load(path, verify=False).manifest)
    assert need >= sum(f.stat().st_size for f in path.glob("*.data")) * 0.5  # the weights, counted once
    monkeypatch.setattr(memory, "available_bytes", lambda: need)  # 90% of it is the most the decoder takes
    engine = Engine.load(path, verify=False)
    assert engine.backend.name == ("onnxruntime" if layout == "fused" else "onnxruntime-paged")
    assert "do not fit the memory available" in engine.backend.native_unavailable
    monkeypatch.setattr(memory, "available_bytes", lambda: 2 * need)
    assert Engine.load(path, verify=False).backend.name == "native"


@pytest.mark.parametrize("precision", ["fp32", "int4"])  # exact kernels, and int8-rounded activations
def test_a_build_whose_native_section_reads_the_weights_wrongly_fails(artifacts, tmp_path, monkeypatch, precision):
    """The build holds the native decoder to the bundle's golden outputs (the graph in ONNX
    Runtime made them, checked against the reference): a section that scales the experts wrongly
    fails the build, and nothing is published."""
    import dataclasses

    from dsexport.build import BuildConfig, build_bundle
    from dsexport.core.errors import InternalError
    from dsexport.exporter import native_index

    original = native_index.NativeIndexer.add_routed

    def wrong_fold(self, g, data_file, i, shards):
        original(self, g, data_file, i, shards)
        routed = self.layers[i].routed
        self.layers[i] = dataclasses.replace(self.layers[i], routed=dataclasses.replace(routed, fold=routed.fold * 2))

    monkeypatch.setattr(native_index.NativeIndexer, "add_routed", wrong_fold)
    out = tmp_path / "bundle"
    with pytest.raises(InternalError, match="native decoder fails golden checks the graphs pass"):
        build_bundle(BuildConfig(artifacts.checkpoint("v3_noaux_tc"), out,
                                 precision=None if precision == "fp32" else precision))
    assert not (out / "manifest.json").exists()


def panel_flags(engine, roles=("qkv", "o_proj", "gate_up", "down"), experts: bool = True) -> set[int]:
    """decoder.c's panel flags of the quantized projections in `roles` and of every layer's routed
    experts. q_b is left out by default: its block scales carry the folded softmax scale, which
    is no fp16 value, so it keeps float scales."""
    backend, flags = engine.backend, set()
    for ly in backend.layers:
        for role in roles:
            lin = getattr(ly, role)
            if lin.bits in (4, 8):
                flags.add(lin.panel)
        if ly.E and experts:
            flags.add(ly.expert_panel)
    return flags


@pytest.mark.parametrize("paged", [True, False])
def test_panels_hold_fp16_scales_and_compute_exactly_what_float_scales_do(artifacts, paged, monkeypatch):
    """The exporter rounds block scales to fp16 values, so the AVX2 panels hold them at 2 bytes
    (panel 2) and give logits bit for bit equal to the same panels with float scales."""
    path = quantized_bundles(artifacts, "int8", paged=paged)
    half = load(path, "native", monkeypatch)
    if not half.backend.half:
        pytest.skip("this build of the kernel library packs no panels with fp16 scales (AVX2 with F16C only)")
    assert panel_flags(half) == {2} and half.backend.model.head.panel == 2
    assert panel_flags(half, ("q_b",), experts=False) == {1}
    # the absorbed W_UK/W_UV of a quantized bundle are fp16 values (absorbed="fp16"), held as fp16
    assert half.manifest.quantization.absorbed == "fp16" and {ly.w_half for ly in half.backend.layers} == {1}
    monkeypatch.setenv("DSEXPORT_NATIVE_HALF_SCALES", "0")
    full = load(path, "native", monkeypatch)
    assert panel_flags(full) == {1} and full.backend.model.head.panel == 1
    assert {ly.w_half for ly in full.backend.layers} == {0}
    steps = half.generate(PROMPT, max_new_tokens=12, ignore_eos=True).output_ids
    assert np.array_equal(teacher_forced_logits(half, PROMPT, steps), teacher_forced_logits(full, PROMPT, steps))


def test_scales_that_are_not_fp16_values_keep_float_panels(artifacts, tmp_path, monkeypatch):
    """A bundle whose head scales are not all fp16 values (an older build, another exporter) keeps
    float scales for that matrix only, and still computes what ONNX Runtime computes."""
    out = tmp_path / "bundle"
    shutil.copytree(quantized_bundles(artifacts, "int8", paged=False), out)
    ref = json.loads((out / "manifest.json").read_text())["native"]["globals"]["head"]["scales"]
    with open(out / ref["file"], "r+b") as f:
        f.seek(ref["offset"])
        scales = np.frombuffer(f.read(ref["bytes"]), np.float32).copy()
        scales[::7] *= np.float32(1 + 2.0 ** -15)  # off the fp16 grid, by far less than a level
        f.seek(ref["offset"])
        f.write(scales.tobytes())
    engine = load(out, "native", monkeypatch)
    if not engine.backend.half:
        pytest.skip("this build of the kernel library packs no panels with fp16 scales (AVX2 with F16C only)")
    assert engine.backend.model.head.panel == 1 and panel_flags(engine) == {2}
    matches_onnxruntime_quantized(out, "int8", monkeypatch)


def test_wide_latent_takes_the_vector_paths_of_the_latent_attention(tmp_path, monkeypatch):
    """kv_lora_rank and v_head_dim of 64 (the tiny variants have 32 and 16, which only the scalar
    tails see): W_UK in 64-column blocks and the 64-wide W_UK/W_UV loops, float at fp32 (against
    ONNX Runtime, 1e-4) and fp16 in a quantized bundle (bit for bit against float W_UK/W_UV, and
    against ONNX Runtime at docs/quantization.md's tolerance)."""
    from dsexport.build import BuildConfig, build_bundle
    from dsexport.exporter.synthetic import write_checkpoint

    ckpt = write_checkpoint(tmp_path / "ckpt", "v3_noaux_tc", kv_lora_rank=64, v_head_dim=64)
    fp32, int4 = tmp_path / "fp32", tmp_path / "int4"
    build_bundle(BuildConfig(ckpt, fp32))
    build_bundle(BuildConfig(ckpt, int4, precision="int4", activations="int8"))
    graphs, nat = load(fp32, "onnxruntime", monkeypatch), load(fp32, "native", monkeypatch)
    steps = graphs.generate(PROMPT, max_new_tokens=12, ignore_eos=True).output_ids
    assert np.abs(teacher_forced_logits(graphs, PROMPT, steps) - teacher_forced_logits(nat, PROMPT, steps)).max() <= 1e-4
    half = load(int4, "native", monkeypatch)
    if not half.backend.half:
        pytest.skip("this build of the kernel library holds no fp16 weights (AVX2 with F16C only)")
    assert {ly.w_half for ly in half.backend.layers} == {1}
    monkeypatch.setenv("DSEXPORT_NATIVE_HALF_SCALES", "0")
    full = load(int4, "native", monkeypatch)
    assert {ly.w_half for ly in full.backend.layers} == {0}
    steps = half.generate(PROMPT, max_new_tokens=12, ignore_eos=True).output_ids
    assert np.array_equal(teacher_forced_logits(half, PROMPT, steps), teacher_forced_logits(full, PROMPT, steps))
    # against ONNX Runtime teacher-forced, at the int8-activation tolerance (not greedy tokens: on
    # this checkpoint one rounding tie moves a later position's logits by 0.07, past a 0.008 margin)
    graphs = load(int4, "onnxruntime", monkeypatch)
    per_position = np.abs(teacher_forced_logits(graphs, PROMPT, steps) - teacher_forced_logits(half, PROMPT, steps)).max(-1)
    assert np.median(per_position) <= 1e-4 and per_position.max() <= 0.25


def test_a_six_bit_head_is_read_at_six_bits_with_the_logits_of_its_8_bit_rows(artifacts, monkeypatch):
    """--quantize lm_head=6 stores 6-bit levels as MatMulNBits 8-bit rows; the AVX2 build packs
    them as 6-bit panels (0.75 bytes a weight where the rows take 1). Their integer block sums
    are the 8-bit panels' exactly, so the logits are bit for bit those of the same rows read at 8
    bits, and the bundle matches ONNX Runtime at the tolerance of docs/quantization.md."""
    from dsexport.build import BuildConfig, build_bundle

    path = artifacts.root / "fused_int4_head6"
    if not (path / "manifest.json").is_file():
        build_bundle(BuildConfig(artifacts.checkpoint("v3_noaux_tc"), path, precision="int4", quantize={"lm_head": 6}))
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["quantization"]["bits"]["lm_head"] == 6 and manifest["native"]["globals"]["head"]["bits"] == 8
    six = load(path, "native", monkeypatch)
    if not six.backend.panels:
        pytest.skip("this build of the kernel library packs no panels (AVX2 only): the head stays 8-bit rows")
    assert six.backend.model.head.bits == 6 and {ly.qkv.bits for ly in six.backend.layers} == {4}
    monkeypatch.setenv("DSEXPORT_NATIVE_SIX_BITS", "0")
    eight = load(path, "native", monkeypatch)
    assert eight.backend.model.head.bits == 8
    steps = six.generate(PROMPT, max_new_tokens=12, ignore_eos=True).output_ids
    assert np.array_equal(teacher_forced_logits(six, PROMPT, steps), teacher_forced_logits(eight, PROMPT, steps))
    monkeypatch.delenv("DSEXPORT_NATIVE_SIX_BITS")
    matches_onnxruntime_quantized(path, "int8", monkeypatch)
    # an int8 head's absmax levels reach -128 in every block: it stays 8-bit
    int8 = load(quantized_bundles(artifacts, "int8", paged=False), "native", monkeypatch)
    assert int8.backend.model.head.bits == 8


def test_greedy_decoding_loops_in_c_with_the_tokens_stops_and_statistics_of_the_python_loop(artifacts, monkeypatch):
    """One greedy sequence decodes in bursts of C steps (decoder.c dsx_decoder_greedy); the tokens,
    finish reasons, text and expert statistics are those of the step-by-step Python loop, for a
    length limit, an end-of-sequence token in the middle of a burst and a stop string."""
    path = quantized_bundles(artifacts, "int8", paged=False)
    c_loop = load(path, "native", monkeypatch)
    calls = []
    greedy = c_loop.backend.greedy
    c_loop.backend.greedy = lambda *a: calls.append(a[3]) or greedy(*a)
    monkeypatch.setenv("DSEXPORT_NATIVE_GREEDY_LOOP", "0")
    py_loop = load(path, "native", monkeypatch)
    assert py_loop.backend.greedy is None

    def both(**kw):
        return [e.generate(PROMPT, **kw) for e in (c_loop, py_loop)]

    c, p = both(max_new_tokens=40, ignore_eos=True)
    assert c.output_ids == p.output_ids and c.finish_reason == p.finish_reason == "length"
    assert len(calls) < 40 and max(calls) > 1  # bursts of several steps
    stats = [e.backend.stats() for e in (c_loop, py_loop)]
    assert stats[0]["decode"] == stats[1]["decode"] and stats[0]["expert_histograms"] == stats[1]["expert_histograms"]
    eos = c.output_ids[9]  # an end-of-sequence token first produced mid-burst
    first = c.output_ids.index(eos)
    for e in (c_loop, py_loop):
        monkeypatch.setattr(e, "eos_ids", e.eos_ids | {eos})
    c, p = both(max_new_tokens=40)
    assert c.output_ids == p.output_ids == p.output_ids[:first + 1] and c.finish_reason == p.finish_reason == "eos"
    assert c_loop.backend.stats()["decode"] == py_loop.backend.stats()["decode"]  # the C loop stopped there too
    for e in (c_loop, py_loop):
        monkeypatch.setattr(e, "eos_ids", e.eos_ids - {eos})
    text = py_loop.generate(PROMPT, max_new_tokens=40, ignore_eos=True).text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert len(stop) == 3
    c, p = both(max_new_tokens=40, ignore_eos=True, stop=stop)
    assert c.text == p.text and c.output_ids == p.output_ids and c.finish_reason == p.finish_reason == "stop"
    # sampling, or a repetition penalty, decodes step by step
    calls.clear()
    c, p = both(max_new_tokens=8, temperature=0.8, seed=3)
    assert c.output_ids == p.output_ids and not calls


def test_the_c_greedy_loop_stops_on_non_finite_logits(artifacts, monkeypatch):
    """The C loop checks each step's logits as the Python loop does: a head weight overwritten with
    Inf after loading (the loader refuses non-finite weights, so only memory can hold one) raises
    NumericalError instead of decoding token 0 on."""
    import ctypes

    from dsexport.core.errors import NumericalError

    engine = load(artifacts.export("v3_noaux_tc"), "native", monkeypatch)
    backend = engine.backend
    T = len(PROMPT)
    logits, cache = backend.forward(np.array([PROMPT]), np.arange(T)[None], np.ones((1, T), np.int64),
                                    backend.empty_cache(1))
    tokens, _ = backend.greedy(int(logits[0, -1].argmax()), T, cache, 3, ())
    assert len(tokens) == 3
    head = backend.model.head
    assert head.bits == 32
    ctypes.cast(head.w, ctypes.POINTER(ctypes.c_float))[7] = float("inf")
    with pytest.raises(NumericalError, match="non-finite"):
        backend.greedy(int(logits[0, -1].argmax()), T, cache, 3, ())
