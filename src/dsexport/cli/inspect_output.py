"""`dsexport inspect`: a stable digest of a bundle's manifest (`--json`) and its text form."""

from __future__ import annotations

import click

from dsexport.core.manifest import Manifest

from ..table import format_table, human_bytes, human_count

ENGINE_PLAN_KEYS = ("precision", "strongly_typed", "builder_flags", "tf32", "context", "prefill_tokens", "workspace_bytes")


def inspect_summary(manifest: Manifest) -> dict:
    """What `dsexport inspect --json` prints (a contract: keys are only ever added)."""
    cfg = manifest.model
    layers = [{"layer": i, "kind": "moe" if cfg.is_moe_layer(i) else "dense", "routed_experts": cfg.num_experts(i),
               "shared_experts": cfg.n_shared_experts if cfg.is_moe_layer(i) else 0}
              for i in range(cfg.num_hidden_layers)]
    decoder = manifest.graphs.decoder
    graphs = {"decoder": [s.file for s in decoder.segments] if decoder.paged else decoder.file}
    if manifest.graphs.mtp is not None:
        graphs["mtp"] = manifest.graphs.mtp.file
    trt = manifest.tensorrt
    tensorrt = None
    if trt is not None:
        plan = trt.engine_plan.to_json()
        tensorrt = {"checked_against": trt.checked_against,
                    "checks": {v: {role: r["ok"] for role, r in c.items()} for v, c in trt.checks.items()},
                    "engine_plan": {k: plan[k] for k in ENGINE_PLAN_KEYS},
                    "engines": manifest.engines.to_json() if manifest.engines else None}
    pruning = None
    if manifest.pruning is not None:
        p = manifest.pruning
        pruning = {"fraction": p.fraction, "criterion": p.criterion, "scope": p.scope,
                   "removed_experts": p.removed_experts, "routed_experts": p.routed_experts,
                   "bytes_saved": p.bytes_saved, "calibration_data": p.calibration_paths}
    return {
        "schema_version": manifest.schema_version, "architecture": cfg.model_type, "num_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
        "attention": {"heads": cfg.num_attention_heads, "q_lora_rank": cfg.q_lora_rank, "kv_lora_rank": cfg.kv_lora_rank,
                      "qk_rope_head_dim": cfg.qk_rope_head_dim, "rope": cfg.rope.type},
        "routing": {"method": cfg.topk_method, "top_k": cfg.num_experts_per_tok, "n_group": cfg.n_group,
                    "topk_group": cfg.topk_group, "routed_scaling_factor": cfg.routed_scaling_factor},
        "layers": layers, "precision": manifest.precision, "target": manifest.target.name,
        "moe_lowering": manifest.export.moe_lowering, "prefill_moe_lowering": manifest.export.prefill_moe_lowering,
        "graphs": graphs, "tensorrt": tensorrt, "pruning": pruning,
        # a CPU bundle whose step the native decoder can run (docs/native.md)
        "native_decoder": manifest.native is not None,
        "native_mtp": manifest.native is not None and manifest.native.mtp is not None,  # drafts in C too
        "parameters": manifest.stats.parameters, "active_parameters_per_token": manifest.stats.active_parameters_per_token,
        "cache_bytes_per_token": manifest.stats.cache_bytes_per_token,
        "files": {name: entry.bytes for name, entry in manifest.files.items()},
        "total_bytes": sum(entry.bytes for entry in manifest.files.values()),
    }


def print_summary(s: dict) -> None:
    a, r = s["attention"], s["routing"]
    moe = [layer for layer in s["layers"] if layer["kind"] == "moe"]
    click.echo(format_table(["property", "value"], [
        ["architecture", f"{s['architecture']}, {s['num_layers']} layers ({len(moe)} MoE), hidden {s['hidden_size']}, "
                         f"vocab {s['vocab_size']}"],
        ["attention", f"MLA, {a['heads']} heads, q_lora_rank {a['q_lora_rank']}, kv_lora_rank {a['kv_lora_rank']}, "
                      f"rope {a['qk_rope_head_dim']} ({a['rope']})"],
        ["routing", f"{r['method']}, top-{r['top_k']}, {r['n_group']} groups keep {r['topk_group']}, "
                    f"scale {r['routed_scaling_factor']}"],
        ["parameters", f"{human_count(s['parameters'])} total, {human_count(s['active_parameters_per_token'])} "
                       "read per decoded token"],
        ["target", f"{s['target']}, precision {s['precision']}, MoE lowering {s['moe_lowering']}"],
        ["kv cache", f"{human_bytes(s['cache_bytes_per_token'])} per token (latent)"],
        *([["decoder", "native on CPUs (docs/native.md), ONNX Runtime otherwise"
                       + ("; the MTP block too" if s.get("native_mtp") else "")]] if s.get("native_decoder") else []),
        ["size", human_bytes(s["total_bytes"])],
    ]))
    click.echo()
    click.echo(format_table(["layer", "kind", "routed experts", "shared experts"],
                            [[x["layer"], x["kind"], x["routed_experts"] or "-", x["shared_experts"] or "-"]
                             for x in s["layers"]], align_right={0, 2, 3}))
    click.echo()
    click.echo(format_table(["file", "size"], [[n, human_bytes(b)] for n, b in s["files"].items()], align_right={1}))
    if s["pruning"]:
        p = s["pruning"]
        click.echo(f"\npruned {p['removed_experts']} of {p['routed_experts']} routed experts by {p['criterion']} "
                   f"({p['scope']}, fraction {p['fraction']}), {human_bytes(p['bytes_saved'])} saved; calibrated on "
                   f"{', '.join(p['calibration_data']) or 'unknown data'}; removed ids per layer in the manifest")
