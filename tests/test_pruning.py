"""Calibration profiles and expert pruning.

A pruned bundle must generate what the reference model generates with the same experts removed
(the reference takes the same plan), for every routing method, including routing groups left
uneven; the profile's counts must be what the reference routes; bad input is one line.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from dsexport.calibration.profile import load_profile
from dsexport.calibration.run import calibrate
from dsexport.calibration.pruning import PruneConfig, plan_pruning
from dsexport.core.errors import UserError
from dsexport.build import BuildConfig, build_bundle
from dsexport.exporter.checkpoint import CheckpointReader
from dsexport.exporter.reference import DeepseekReference, route
from dsexport.runtime import Engine

from conftest import VARIANTS

TEXT = ("In the beginning the router chose two experts for every token. The cache held only the latent, "
        "and the device ran what the router picked. ") * 40


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def profiles(artifacts, data_file):
    return {v: calibrate(artifacts.checkpoint(v), [data_file], samples=24, seq_len=32, min_tokens=2) for v in VARIANTS}


@torch.no_grad()
def test_profile_counts_are_what_the_reference_routes(artifacts, profiles):
    """Streamed layer by layer, the profile equals a direct count on the full reference model:
    every token picks top-k experts, routing weights and contributions recomputed independently."""
    variant = "v3_noaux_tc"
    profile = profiles[variant]
    reader = CheckpointReader(artifacts.checkpoint(variant))
    cfg = reader.config
    model = DeepseekReference.from_checkpoint(reader)
    from dsexport.calibration.data import load_sequences
    from dsexport.runtime.tokenizer import BundleTokenizer

    sequences, _ = load_sequences([profile.data[0]["path"]], BundleTokenizer.from_directory(reader.dir), profile.samples, profile.seq_len)
    captured = {}
    hooks = [model.layers[lp.layer].mlp.register_forward_pre_hook(
        lambda mod, args, i=lp.layer: captured.setdefault(i, []).append(args[0].reshape(-1, cfg.hidden_size)))
        for lp in profile.layers]
    with torch.no_grad():
        for s in sequences:
            model(torch.tensor([s]))
    for h in hooks:
        h.remove()
    for lp in profile.layers:
        moe = model.layers[lp.layer].mlp
        x = torch.cat(captured[lp.layer]).detach()  # [N, D]
        weights, idx = route(x @ moe.router.T, moe.bias, cfg, moe.groups)
        counts = torch.bincount(idx.flatten(), minlength=len(lp.expert_ids))
        assert lp.selected == counts.tolist() and sum(lp.selected) == profile.tokens * cfg.num_experts_per_tok
        contribution = torch.zeros(len(lp.expert_ids), dtype=torch.float64)
        for e in range(len(lp.expert_ids)):
            rows = (idx == e).nonzero()
            h = x[rows[:, 0]]
            out = (torch.nn.functional.silu(h @ moe.w_gate[e].T) * (h @ moe.w_up[e].T)) @ moe.w_down[e].T
            contribution[e] = (weights[rows[:, 0], rows[:, 1]].double() * out.norm(dim=-1).double()).sum()
        np.testing.assert_allclose(np.asarray(lp.contribution) * np.asarray(lp.selected), contribution.numpy(), rtol=1e-4)
        np.testing.assert_allclose(sum(lp.weight_mass), weights.double().sum().item(), rtol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_pruned_bundle_generates_what_the_pruned_reference_generates(artifacts, profiles, tmp_path, variant):
    ckpt = artifacts.checkpoint(variant)
    cfg = CheckpointReader(ckpt).config
    uneven = False
    for fraction, criterion, scope in ((0.25, "output-mass", "per-layer"), (0.5, "contribution", "global")):
        plan = plan_pruning(cfg, profiles[variant], PruneConfig(fraction, criterion, scope))
        for layer, kept in plan.kept.items():
            assert cfg.routable(kept) and len(kept) >= cfg.num_experts_per_tok
            if cfg.grouped_routing:
                size = cfg.n_routed_experts // cfg.n_group
                uneven |= len({sum(1 for e in kept if e // size == g) for g in range(cfg.n_group)}) > 1
        out = tmp_path / f"{fraction}"
        build_bundle(BuildConfig(ckpt, out, kept_experts=plan.kept, pruning=plan.to_json(profiles[variant])))
        reader = CheckpointReader(ckpt)
        reader.config = reader.config.with_kept_experts(plan.kept)
        reference = DeepseekReference.from_checkpoint(reader)
        engine = Engine.load(out, threads=2)
        assert engine.manifest.to_json()["pruning"]["layers"][str(min(plan.kept))]["kept"] == plan.kept[min(plan.kept)]
        prompt = np.random.default_rng(7).integers(3, cfg.vocab_size, size=10).tolist()
        output = engine.generate(prompt, max_new_tokens=24, ignore_eos=True).output_ids
        with torch.no_grad():
            ref = reference(torch.tensor([prompt + output]))[0].numpy()
        assert (ref[len(prompt) - 1:-1].argmax(-1) == np.array(output)).all()  # greedy, token for token
    if cfg.grouped_routing:
        assert uneven  # the plans left routing groups of different sizes


def test_plan_budgets_criteria_and_refusals(artifacts, profiles):
    variant = "v2_group_limited"  # 8 experts in 4 groups, 2 groups kept, top-2
    cfg = CheckpointReader(artifacts.checkpoint(variant)).config
    profile = profiles[variant]
    per_layer = plan_pruning(cfg, profile, PruneConfig(0.25, "frequency", "per-layer"))
    for layer, removed in per_layer.removed.items():
        assert len(removed) == round(0.25 * cfg.n_routed_experts)
        sel = dict(zip(profile.layer(layer).expert_ids, profile.layer(layer).selected))
        assert max(sel[e] for e in removed) <= min(sel[e] for e in per_layer.kept[layer])  # the least used go
    heavy = plan_pruning(cfg, profile, PruneConfig(0.9, "output-mass", "global"))
    for kept in heavy.kept.values():  # far past what routing allows: stops at the limit, says how often
        assert cfg.routable(kept)
    assert heavy.skipped > 0
    assert per_layer.bytes_saved == sum(map(len, per_layer.removed.values())) * per_layer.bytes_per_expert
    with pytest.raises(UserError, match="between 0 and 1"):
        PruneConfig(1.5)


def test_calibrate_cli_writes_profile_and_heatmaps(artifacts, data_file, tmp_path, run_cli):
    ckpt = artifacts.checkpoint("v3_noaux_tc")
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": t}]})
                              for t in TEXT.split(". ")[:12]))
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in TEXT.split(". ")[:12]))
    code, out, err = run_cli("calibrate", "--model", ckpt, "--data", data_file, "--data", jsonl, "--data", chat,
                             "--out", tmp_path / "prof", "--samples", 30, "--seq-len", 24)
    assert code == 0, err
    assert "coverage:" in out and "experts routed at least" in out
    profile = load_profile(tmp_path / "prof")
    assert [d["format"] for d in profile.data] == ["text", "jsonl", "chat"] and profile.samples == 30
    for name in ("frequency", "contribution"):
        png = (tmp_path / "prof" / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", png[16:24])
        assert width > 8 * height / len(profile.layers)  # a column per expert, a row per MoE layer

    code, out, _ = run_cli("plan", "--model", ckpt, "--target", "x86-cpu", "--prune", 0.25, "--calib", tmp_path / "prof",
                           "--json")
    plan = json.loads(out)
    assert code == 0 and plan["pruning"]["bytes_saved"] > 0
    code, out, _ = run_cli("plan", "--model", ckpt, "--target", "x86-cpu", "--json")
    assert json.loads(out)["weights_bytes"] - plan["weights_bytes"] == pytest.approx(plan["pruning"]["bytes_saved"], rel=0.01)

    code, _, err = run_cli("build", "--model", ckpt, "--out", tmp_path / "b", "--prune", 0.25, "--calib", data_file)
    assert code == 0, err  # calibrated on the fly
    code, out, _ = run_cli("inspect", tmp_path / "b", "--json")
    assert json.loads(out)["pruning"]["removed_experts"] > 0


@pytest.mark.parametrize("args, words", [
    (["--prune", 0.25], "--prune needs --calib"),
    (["--prune", 2, "--calib", "PROFILE"], "between 0 and 1"),
    (["--prune", 0.25, "--calib", "OTHER"], "profile is of another model"),
    (["--prune", 0.25, "--calib", "BADJSONL"], "line 2 is not JSON"),
])
def test_bad_pruning_input_is_one_line(artifacts, data_file, tmp_path, run_cli, args, words):
    ckpt = artifacts.checkpoint("v3_noaux_tc")
    other = calibrate(artifacts.checkpoint("v2_greedy"), [data_file], samples=4, seq_len=16)
    other.save(tmp_path / "other")
    calibrate(ckpt, [data_file], samples=4, seq_len=16).save(tmp_path / "prof")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json\n')
    subst = {"PROFILE": tmp_path / "prof", "OTHER": tmp_path / "other", "BADJSONL": bad}
    code, _, err = run_cli("build", "--model", ckpt, "--out", tmp_path / "b", *[subst.get(a, a) for a in args])
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and words in lines[0] and "Traceback" not in err
    assert not (tmp_path / "b").exists()
