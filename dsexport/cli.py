"""The `dsexport` command line.

    dsexport build --model ./ckpt --target x86-cpu --out ./dist/mymodel
    dsexport run ./dist/mymodel --prompt "Once upon a time"
    dsexport inspect ./dist/mymodel [--json]
    dsexport targets [--json]

Errors in the user's input print one line, `error: ...`, and exit non-zero (codes in
docs/cli.md); anything else is a dsexport bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from dsexport.errors import EngineUnavailable, UserError

from .table import format_table, human_bytes, human_count


class Progress:
    """Stage progress on stderr: a live line on a terminal, one line per stage otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()
        self.stage = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        elapsed = time.perf_counter() - self.start
        text = f"{stage}: {done}/{total}" + (" layers" if stage == "export" else "") + f"  [{elapsed:6.1f} s]"
        if self.tty:
            click.echo("\r" + text + " " * 8, nl=done >= total, err=True)
        elif done >= total:
            click.echo(text, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dsexport")
def cli() -> None:
    """Compile DeepSeek-V2/V3 Mixture-of-Experts checkpoints into ONNX Runtime bundles."""


def _prune_options(fn):
    for option in reversed([
        click.option("--prune", type=float, default=None,
                     help="Remove this fraction of routed experts (0..1), chosen from --calib (docs/pruning.md)."),
        click.option("--calib", type=click.Path(path_type=Path), default=None,
                     help="A calibration profile directory (`dsexport calibrate`), or a text/JSONL file to calibrate on now."),
        click.option("--prune-by", default="output-mass", show_default=True,
                     type=click.Choice(["frequency", "contribution", "output-mass"]),
                     help="What keeps an expert (docs/pruning.md): output-mass when deployment text is like the "
                          "calibration text, contribution (REAP) when it may not be."),
        click.option("--prune-scope", default="global", show_default=True, type=click.Choice(["per-layer", "global"]),
                     help="global: one budget over all MoE layers (scores divided by their layer mean); per-layer: each layer loses the fraction."),
    ]):
        fn = option(fn)
    return fn


def _pruning_plan(model_dir: Path, prune: float | None, calib: Path | None, prune_by: str, prune_scope: str,
                  bytes_per_weight: float = 4.0):
    """(PruningPlan, Profile) from the flags, or None without --prune."""
    if prune is None:
        if calib is not None:
            raise UserError("--calib is given without --prune FRACTION")
        return None
    if calib is None:
        raise UserError("--prune needs --calib: a calibration profile (`dsexport calibrate`) or a data file")
    from dsexport.calibration.profile import PROFILE_FILE, calibrate, load_profile
    from dsexport.calibration.pruning import PruneConfig, check_profile_matches, plan_pruning
    from dsexport.exporter.checkpoint import CheckpointReader
    from dsexport.runtime.bundle import sha256_file

    prune_cfg = PruneConfig(prune, prune_by, prune_scope)
    reader = CheckpointReader(model_dir)
    if calib.is_dir() or calib.name == PROFILE_FILE:
        profile = load_profile(calib)
    else:
        click.echo(f"calibrating on {calib} (64 sequences of 256 tokens; `dsexport calibrate` sets more)", err=True)
        profile = calibrate(model_dir, [calib], samples=64, seq_len=256, progress=Progress())
    check_profile_matches(profile, reader.config, sha256_file(reader.dir / "config.json"))
    return plan_pruning(reader.config, profile, prune_cfg, bytes_per_weight), profile


@cli.command()
@click.option("--model", "model_dir", default=None, type=click.Path(path_type=Path),
              help="Hugging Face checkpoint directory (config.json, safetensors, tokenizer). "
                   "Default: the small trained model that ships with dsexport.")
@click.option("--target", default="x86-cpu", show_default=True, help="Device target (`dsexport targets`).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Bundle directory to write.")
@click.option("--precision", default=None, help="Weight precision (default: the target's).")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle at --out, once the new one is complete.")
@click.option("--moe-lowering", default=None, help="Override the target's MoE lowering (see docs/lowering.md).")
@click.option("--moe-shards", default=None, type=click.IntRange(1, 64),
              help="Split each expert in N slices for N threads (default: the target's; docs/lowering.md).")
@click.option("--max-context", default=None, type=click.IntRange(2),
              help="Context the bundle is planned for (default: the target's, at most the model's).")
@click.option("--tensorrt", "tensorrt", default=None,
              help="TensorRT version the graphs must parse on (TensorRT targets; default: the target's).")
@click.option("--force", is_flag=True, help="Build even when the memory plan says the target cannot hold it.")
@click.option("--block-size", default=32, show_default=True, type=click.Choice(["32", "64", "128"]),
              help="Quantization block: weights per scale (int8/int4).")
@click.option("--activations", default="int8", show_default=True, type=click.Choice(["int8", "fp32"]),
              help="int8: quantized kernels quantize their inputs per block (ONNX Runtime's fast path); fp32: "
                   "exact, slower (8-bit experts always quantize; docs/quantization.md).")
@click.option("--expert-block-size", default=None, type=click.Choice(["32", "64", "128"]),
              help="Routed experts' quantization block, when it should differ from --block-size.")
@click.option("--zero-points", is_flag=True,
              help="Asymmetric quantization: a zero point per block besides the scale (ONNX Runtime targets).")
@click.option("--quantize", "quantize", multiple=True, metavar="PART=BITS",
              help="Per part bits over the precision's preset: PART in attention, shared_experts, routed_experts, "
                   "dense_mlp, lm_head; BITS 4, 8 or none (fp32). Repeatable; docs/quantization.md.")
@click.option("--expert-bits", default=None, metavar="BITS:FRACTION",
              help="Give the FRACTION of routed experts that matter most (by --prune-by, from --calib) BITS bits, "
                   "e.g. 8:0.25 on an int4 build (docs/quantization.md).")
@click.option("--paged/--no-paged", default=None,
              help="Keep routed experts in a store the runtime pages (docs/paging.md). Default: paged when the "
                   "target's memory cannot hold every expert and its backend can page.")
@click.option("--expert-cache-mb", default=None, type=float,
              help="A paged bundle's default expert cache in MiB (default: what the target's memory plan leaves).")
@click.option("--mtp/--no-mtp", "mtp", default=None,
              help="Include the checkpoint's MTP module as a drafting graph (default: when it has one and the "
                   "bundle is one ONNX Runtime graph; docs/mtp.md).")
@_prune_options
def build(model_dir: Path | None, target: str, out_dir: Path, precision: str | None, overwrite: bool,
          moe_lowering: str | None, moe_shards: int | None, max_context: int | None, tensorrt: str | None,
          force: bool, block_size: str, quantize: tuple[str, ...], expert_bits: str | None, paged: bool | None,
          expert_cache_mb: float | None, prune: float | None, zero_points: bool, activations: str,
          expert_block_size: str | None,
          calib: Path | None, prune_by: str, prune_scope: str, mtp: bool | None = None) -> None:
    """Export a checkpoint into a bundle for a target."""
    from dsexport import EMBEDDED_MODEL
    from dsexport.exporter.bundle import BuildConfig, build_bundle

    if model_dir is None:
        model_dir = EMBEDDED_MODEL
        click.echo(f"no --model: using the embedded model ({model_dir})", err=True)
    target = _resolve_target(target)
    pruning = _pruning_plan(model_dir, prune, calib if prune is not None else None, prune_by, prune_scope)
    widths = _expert_bits(model_dir, expert_bits, calib, prune_by, pruning)
    config = BuildConfig(model_dir, out_dir, target, precision, overwrite, moe_lowering=moe_lowering,
                         moe_shards=moe_shards, max_context=max_context, tensorrt=tensorrt, force=force,
                         kept_experts=pruning[0].kept if pruning else None,
                         pruning=pruning[0].to_json(pruning[1]) if pruning else None,
                         block_size=int(block_size), quantize=_parse_quantize(quantize), expert_bits=widths,
                         paged=paged, expert_cache_mb=expert_cache_mb, mtp=mtp, zero_points=zero_points,
                         activations=activations,
                         expert_block_size=int(expert_block_size) if expert_block_size else None)
    if pruning:
        click.echo(f"pruning {pruning[0].to_json()['removed_experts']} of {pruning[0].to_json()['routed_experts']} "
                   f"routed experts by {prune_by} ({prune_scope})", err=True)
    result = build_bundle(config, Progress())
    m = result.manifest
    rows = [[name, human_bytes(entry["bytes"])] for name, entry in m["files"].items()]
    click.echo(format_table(["file", "size"], rows, align_right={1}))
    if "quantization" in m:
        q = m["quantization"]
        click.echo("quantized: " + ", ".join(f"{part} int{b}" for part, b in q["bits"].items())
                   + f", {q.get('scheme', 'absmax')}, blocks of {q['block_size']}"
                   + (" (int8 per channel)" if 8 in q.get("per_channel_bits", ()) else "")
                   + "; router, norms, embeddings fp32")
    click.echo(f"wrote {out_dir}: target {m['target']['name']}, precision {m['precision']}, "
               f"MoE lowering {m['export']['moe_lowering']}"
               + (f" (prompts: {m['export']['prefill_moe_lowering']})" if m["export"].get("prefill_moe_lowering") else ""))
    if "tensorrt" in m:
        for line in _tensorrt_summary(m):
            click.echo(line)


def _expert_bits(model_dir: Path, spec: str | None, calib: Path | None, criterion: str, pruning):
    """--expert-bits BITS:FRACTION -> {layer: {expert id: bits}} from the calibration profile."""
    if spec is None:
        return None
    try:
        bits, fraction = spec.split(":")
        bits, fraction = int(bits), float(fraction)
    except ValueError:
        raise UserError(f"--expert-bits {spec!r}: expected BITS:FRACTION, e.g. 8:0.25") from None
    if calib is None:
        raise UserError("--expert-bits needs --calib: a calibration profile (`dsexport calibrate`)")
    from dsexport.calibration.profile import load_profile
    from dsexport.calibration.pruning import plan_expert_bits
    from dsexport.exporter.checkpoint import CheckpointReader

    profile = pruning[1] if pruning else load_profile(calib)
    return plan_expert_bits(CheckpointReader(model_dir).config, profile, bits, fraction, criterion,
                            pruning[0].kept if pruning else None)


def _parse_quantize(items: tuple[str, ...]) -> dict[str, int | None] | None:
    out: dict[str, int | None] = {}
    for item in items:
        part, _, bits = item.partition("=")
        if bits not in ("4", "8", "none"):
            raise UserError(f"--quantize {item!r}: expected PART=4, PART=8 or PART=none")
        out[part.strip().replace("-", "_")] = None if bits == "none" else int(bits)
    return out or None


def _resolve_target(name: str) -> str:
    from dsexport.targets import resolve_target_name

    resolved, note = resolve_target_name(name)
    if note:
        click.echo(note, err=True)
    return resolved


def _tensorrt_summary(manifest: dict) -> list[str]:
    trt = manifest["tensorrt"]
    plan = trt["engine_plan"]
    lines = []
    for version, graphs in trt["checks"].items():
        verdict = ", ".join(f"{role} {'ok' if r['ok'] else str(len(r['errors'])) + ' errors'} ({r['nodes']} nodes)"
                            for role, r in graphs.items())
        lines.append(f"TensorRT {version} check: {verdict}" + ("  <- build target" if version == trt["checked_against"] else ""))
    flags = "strongly typed" if plan["strongly_typed"] else ("flags " + "+".join(plan["builder_flags"]) if plan["builder_flags"] else "fp32")
    lines.append(f"engine plan: {plan['precision']} ({flags}, TF32 {'on' if plan['tf32'] else 'off'}), "
                 f"context {plan['context']}, prefill chunks of {plan['prefill_tokens']} tokens, workspace "
                 f"{human_bytes(plan['workspace_bytes'])}; on the device: dsexport engine BUNDLE")
    return lines


def _generation_kwargs(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop) -> dict:
    return dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                repetition_penalty=repetition_penalty, seed=seed, stop=list(stop))


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="Prompt text.")
@click.option("--chat", is_flag=True, help="Wrap the prompt as a user message with the bundle's chat template.")
@click.option("--max-new-tokens", default=128, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy.")
@click.option("--top-k", default=0, show_default=True, type=int, help="0 = off.")
@click.option("--top-p", default=1.0, show_default=True, type=float, help="1 = off.")
@click.option("--repetition-penalty", default=1.0, show_default=True, type=float, help="1 = off.")
@click.option("--seed", default=None, type=int)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--threads", default=None, type=int, help="ONNX Runtime intra-op threads (default: all cores).")
@click.option("--max-context", default=None, type=int, help="Context limit in tokens (default: the model's).")
@click.option("--weights", default="mmap", show_default=True, type=click.Choice(["mmap", "mlock", "memory"]),
              help="How weights are held: mapped, mapped and locked in RAM, or read into memory.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the bundle's files.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@click.option("--backend", default="onnxruntime", show_default=True, type=click.Choice(["onnxruntime", "tensorrt"]),
              help="Run the ONNX graphs with ONNX Runtime, or the engines `dsexport engine` built on this device.")
@click.option("--expert-cache-mb", default=None, type=float,
              help="Paged bundles: MiB of routed experts kept resident (default: the bundle's; docs/paging.md).")
@click.option("--cache-policy", default=None, type=click.Choice(["lfu", "lru"]),
              help="Paged bundles: expert eviction policy (default: lfu).")
@click.option("--no-prefetch", is_flag=True, help="Paged bundles: do not load predicted experts ahead.")
@click.option("--stats", is_flag=True, help="Paged bundles: print expert-cache statistics of the generation.")
@click.option("--draft", type=click.Choice(["mtp"]), default=None,
              help="Draft with the bundle's MTP graph and verify two tokens per decoder run; prints drafting "
                   "statistics (docs/mtp.md).")
@click.option("--no-draft", is_flag=True, help="Decode one token per decoder run (the default: on CPUs drafting does not pay).")
def run(bundle: Path, prompt: str, chat: bool, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
        repetition_penalty: float, seed: int | None, stop: tuple[str, ...], threads: int | None,
        max_context: int | None, weights: str, no_verify: bool, as_json: bool, backend: str,
        expert_cache_mb: float | None, cache_policy: str | None, no_prefetch: bool, stats: bool,
        draft: str | None = None, no_draft: bool = False) -> None:
    """Generate text from a bundle."""
    from dsexport.runtime import Engine

    if draft and no_draft:
        raise UserError("--draft and --no-draft contradict each other; pass one")
    engine = Engine.load(bundle, threads=threads, max_context=max_context, weights=weights, verify=not no_verify,
                         backend=backend, expert_cache_mb=expert_cache_mb, cache_policy=cache_policy,
                         prefetch=not no_prefetch, draft=None if no_draft else draft)
    paging = getattr(engine.backend, "paging_stats", None)
    if stats and paging is None:
        raise UserError(f"{bundle} is not a paged bundle: --stats reports expert paging (build --paged)")
    if chat:
        prompt = engine.apply_chat_template([{"role": "user", "content": prompt}])
    kwargs = _generation_kwargs(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop)
    if as_json:
        result = engine.generate(prompt, **kwargs)
        click.echo(json.dumps({
            "prompt_ids": result.prompt_ids, "output_ids": result.output_ids, "text": result.text,
            "finish_reason": result.finish_reason, "ttft_s": result.ttft_s,
            "prefill_tokens_per_s": result.prefill_tokens_per_s, "decode_tokens_per_s": result.decode_tokens_per_s,
            **({"paging_stats": result.paging_stats} if stats else {}),
            **({"draft": result.draft_stats.to_json()} if result.draft_stats else {}),
        }))
        return
    if paging is not None:
        engine.backend.reset_stats()
    for event in engine.stream(prompt, **kwargs):
        click.echo(event.text, nl=False)
        sys.stdout.flush()
    click.echo()
    if stats:
        for line in paging_lines(paging()):
            click.echo(line, err=True)
    if engine.drafter is not None and engine.drafter.last_stats is not None:
        click.echo(engine.drafter.last_stats.summary(), err=True)


def paging_lines(s: dict) -> list[str]:
    """`run --stats`: the expert cache's figures for one generation, then per layer the experts
    requested most."""
    pct = lambda x: "-" if x is None else f"{x:.1%}"  # noqa: E731
    per_token = s["bytes_read_per_token"]
    lines = [f"expert cache: {s['policy']}, prefetch {'on' if s['prefetch'] else 'off'}, budget "
             f"{human_bytes(s['budget_bytes'])} ({s['resident_experts']} of {s['total_experts']} experts resident)",
             f"decode hit rate {pct(s['hit_rate'])} ({s['decode']['hits']} of {s['decode']['requests']}), "
             f"prompt {pct(s['prefill_hit_rate'])}; read {human_bytes(s['bytes_read'])} in all, "
             f"{human_bytes(per_token) if per_token is not None else '-'} per decoded token; "
             f"stalled {s['stall_s'] * 1e3:.1f} ms on loads",
             f"prefetch: {s['prefetches']['issued']} predicted, {s['prefetches']['loaded']} loaded, "
             f"{s['prefetches']['used']} used before eviction, {s['prefetches']['late']} still loading when needed"]
    for layer, counts in s["expert_histograms"].items():
        top = sorted(range(len(counts)), key=lambda e: -counts[e])[:6]
        lines.append(f"layer {layer}: {sum(counts)} requests over {sum(1 for c in counts if c)} experts; most: "
                     + ", ".join(f"{e}x{counts[e]}" for e in top if counts[e]))
    return lines


def inspect_summary(manifest: dict) -> dict:
    """What `dsexport inspect --json` prints: a stable digest of the manifest."""
    m = manifest["model"]
    kept = m.get("kept_experts")
    layers = []
    for i in range(m["num_hidden_layers"]):
        moe = i >= m["first_k_dense_replace"] and m["n_routed_experts"] > 0
        routed = (len(kept[i]) if kept else m["n_routed_experts"]) if moe else 0
        layers.append({"layer": i, "kind": "moe" if moe else "dense", "routed_experts": routed,
                       "shared_experts": m["n_shared_experts"] if moe else 0})
    return {
        "schema_version": manifest["schema_version"],
        "architecture": m["model_type"],
        "num_layers": m["num_hidden_layers"],
        "hidden_size": m["hidden_size"],
        "vocab_size": m["vocab_size"],
        "attention": {"heads": m["num_attention_heads"], "q_lora_rank": m["q_lora_rank"],
                      "kv_lora_rank": m["kv_lora_rank"], "qk_rope_head_dim": m["qk_rope_head_dim"],
                      "rope": m["rope"]["type"]},
        "routing": {"method": m["topk_method"], "top_k": m["num_experts_per_tok"], "n_group": m["n_group"],
                    "topk_group": m["topk_group"], "routed_scaling_factor": m["routed_scaling_factor"]},
        "layers": layers,
        "precision": manifest["precision"],
        "target": manifest["target"]["name"],
        "moe_lowering": manifest["export"]["moe_lowering"],
        "prefill_moe_lowering": manifest["export"].get("prefill_moe_lowering"),
        "graphs": {role: g.get("file") or [s["file"] for s in g.get("segments", [])]
                   for role, g in manifest["graphs"].items()},
        "tensorrt": ({"checked_against": manifest["tensorrt"]["checked_against"],
                      "checks": {v: {role: r["ok"] for role, r in c.items()} for v, c in manifest["tensorrt"]["checks"].items()},
                      "engine_plan": {k: manifest["tensorrt"]["engine_plan"][k] for k in
                                      ("precision", "strongly_typed", "builder_flags", "tf32", "context", "prefill_tokens",
                                       "workspace_bytes")},
                      "engines": manifest.get("engines")} if "tensorrt" in manifest else None),
        "pruning": ({k: manifest["pruning"][k] for k in ("fraction", "criterion", "scope", "removed_experts",
                                                          "routed_experts", "bytes_saved")}
                    | {"calibration_data": [d["path"] for d in manifest["pruning"].get("calibration", {}).get("data", [])]}
                    if "pruning" in manifest else None),
        "parameters": manifest["stats"]["parameters"],
        "active_parameters_per_token": manifest["stats"]["active_parameters_per_token"],
        "cache_bytes_per_token": manifest["stats"]["cache_bytes_per_token"],
        "files": {name: entry["bytes"] for name, entry in manifest["files"].items()},
        "total_bytes": sum(entry["bytes"] for entry in manifest["files"].values()),
    }


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--verify", is_flag=True, help="Also check every file's sha256.")
def inspect(bundle: Path, as_json: bool, verify: bool) -> None:
    """Describe a bundle: architecture, experts per layer, precision, sizes, cache per token."""
    from dsexport.runtime.bundle import read_bundle

    s = inspect_summary(read_bundle(bundle, verify=verify).manifest)
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
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
    if s["tensorrt"]:
        click.echo()
        for line in _tensorrt_summary(read_bundle(bundle, verify=False).manifest):
            click.echo(line)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def targets(as_json: bool) -> None:
    """List the device targets (`jetson` and `jetson-orin-nano` resolve to jetson-orin-nano-8gb)."""
    import dataclasses

    from dsexport.targets import TARGETS

    items = [dataclasses.asdict(t) for t in TARGETS.values()]
    if as_json:
        click.echo(json.dumps(items, indent=2))
        return
    rows = []
    for t in items:
        d = t["device"]
        rows.append([t["name"], t["backend"], ",".join(t["precisions"]), t["moe_lowering"],
                     f"{d['usable_gb']:g}/{d['memory_gb']:g} GB" if d else "host", f"{d['bandwidth_gbs']:g} GB/s" if d else "host",
                     "yes" if t["buildable"] else "plan only"])
    click.echo(format_table(["target", "backend", "precisions", "MoE lowering", "usable/total", "bandwidth", "build"], rows))


@cli.command()
@click.option("--model", "model_dir", default=None, type=click.Path(path_type=Path),
              help="Checkpoint directory (default: the embedded model).")
@click.option("--data", "data", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Text, JSONL with \"text\", or chat JSONL with \"messages\" (repeatable).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Profile directory to write.")
@click.option("--samples", default=128, show_default=True, type=click.IntRange(1), help="Sequences to run.")
@click.option("--seq-len", default=256, show_default=True, type=click.IntRange(2), help="Tokens per sequence (at most).")
@click.option("--min-tokens", default=8, show_default=True, type=click.IntRange(1),
              help="An expert routed fewer tokens is reported as not covered.")
@click.option("--json", "as_json", is_flag=True, help="Print the profile's summary as JSON.")
def calibrate(model_dir: Path | None, data: tuple[Path, ...], out_dir: Path, samples: int, seq_len: int,
              min_tokens: int, as_json: bool) -> None:
    """Record which experts calibration text routes to, per layer: profile.json and heatmaps."""
    import numpy as np

    from dsexport import EMBEDDED_MODEL
    from dsexport.calibration.heatmap import write_heatmap
    from dsexport.calibration.profile import SUMMARY_HEADERS, calibrate as run_calibration

    model_dir = model_dir or EMBEDDED_MODEL
    profile = run_calibration(model_dir, list(data), samples, seq_len, min_tokens, Progress())
    path = profile.save(out_dir)
    experts = profile.model["n_routed_experts"]
    for name, values in (("frequency", lambda lp: np.asarray(lp.selected, float) / max(profile.tokens, 1)),
                         ("contribution", lambda lp: np.asarray(lp.contribution, float))):
        grid = np.full((len(profile.layers), experts), np.nan)
        for r, lp in enumerate(profile.layers):
            grid[r, lp.expert_ids] = values(lp)
        write_heatmap(out_dir / f"{name}.png", grid)
    uncovered = sum(len(lp.not_covered(min_tokens)) for lp in profile.layers)
    total = sum(len(lp.expert_ids) for lp in profile.layers)
    if as_json:
        click.echo(json.dumps({"profile": str(path), "tokens": profile.tokens, "sequences": profile.samples,
                               "seconds": profile.seconds, "not_covered": uncovered, "experts": total,
                               "layers": [dict(zip(SUMMARY_HEADERS, row)) for row in profile.summary_rows()]}, indent=2))
        return
    click.echo(format_table(SUMMARY_HEADERS, profile.summary_rows(), align_right=set(range(len(SUMMARY_HEADERS)))))
    click.echo(f"{profile.samples} sequences, {profile.tokens} tokens in {profile.seconds:.1f} s; coverage: "
               f"{total - uncovered}/{total} experts routed at least {min_tokens} tokens"
               + (f" ({uncovered} not covered: too few tokens to judge; more --samples would)" if uncovered else ""))
    click.echo(f"wrote {path}, {out_dir / 'frequency.png'}, {out_dir / 'contribution.png'}")


@cli.command()
@click.option("--model", "model_dir", default=None, type=click.Path(path_type=Path),
              help="Checkpoint directory or config.json (default: the embedded model).")
@click.option("--target", required=True, help="Device target (`dsexport targets`).")
@click.option("--precision", default=None, help="Weight precision (default: the target's).")
@click.option("--context", default=4096, show_default=True, type=click.IntRange(1), help="Context length to plan for.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_prune_options
def plan(model_dir: Path | None, target: str, precision: str | None, context: int, as_json: bool,
         prune: float | None, calib: Path | None, prune_by: str, prune_scope: str) -> None:
    """Memory-fit plan: what a bundle will need on a target, and whether it fits (with --prune:
    the experts removed and the bytes saved per layer, before anything is written)."""
    from dsexport import EMBEDDED_MODEL
    from dsexport.exporter.config import load_config
    from dsexport.targets import get_target
    from dsexport.targets.memory_plan import BYTES_PER_WEIGHT, paging_plan, plan_memory, suggestions

    path = model_dir or EMBEDDED_MODEL
    cfg = load_config(path.parent if path.name == "config.json" else path)
    tgt = get_target(_resolve_target(target))
    precision = precision or tgt.default_precision
    if precision not in tgt.precisions:
        raise UserError(f"precision {precision!r} is not available for {tgt.name}; choose from {', '.join(tgt.precisions)}")
    pruning = _pruning_plan(path.parent if path.name == "config.json" else path, prune, calib, prune_by,
                            prune_scope, BYTES_PER_WEIGHT[precision])
    if pruning:
        cfg = cfg.with_kept_experts(pruning[0].kept)
    p = plan_memory(cfg, tgt, precision, context)
    advice = suggestions(cfg, tgt, p)
    paging = paging_plan(cfg, tgt, p)
    if as_json:
        click.echo(json.dumps({**p.to_json(), "suggestions": advice, "paging": paging,
                               "pruning": pruning[0].to_json() if pruning else None}, indent=2))
        return
    if pruning:
        pp = pruning[0]
        click.echo(format_table(["layer", "experts kept", "removed", "removed ids", "bytes saved"],
                                [[layer, len(pp.kept[layer]), len(pp.removed[layer]),
                                  ",".join(map(str, pp.removed[layer])) or "-",
                                  human_bytes(len(pp.removed[layer]) * pp.bytes_per_expert)] for layer in pp.kept],
                                align_right={0, 1, 2, 4}))
        click.echo(f"pruning by {prune_by} ({prune_scope}) saves {human_bytes(pp.bytes_saved)} at {precision}"
                   + (f"; {pp.skipped} removals refused to keep routing well defined" if pp.skipped else ""))
        click.echo()
    gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
    rows = [["weights", gb(p.weights_bytes)], [f"latent KV cache ({context} tokens)", gb(p.kv_cache_bytes)],
            ["activations and workspace", gb(p.activation_bytes)], ["runtime overhead", gb(p.overhead_bytes)],
            ["total", gb(p.total_bytes)],
            ["usable on the device", gb(p.usable_bytes) if p.usable_bytes else "the host's"]]
    click.echo(format_table(["item", "bytes"], rows, align_right={1}))
    if p.fits is not None:
        click.echo(f"{'fits' if p.fits else 'does not fit'}: margin {p.margin_bytes / 1e9:+.2f} GB")
    for line in advice:
        click.echo(f"  would fit with: {line}")
    if not paging["can_page"]:
        click.echo(f"expert paging: not available ({paging['reason']})")
    elif paging["cache_bytes"] is not None:
        click.echo(f"expert paging: {paging['cache_bytes'] / 1e9:.2f} GB left for an expert cache of the "
                   f"{paging['store_bytes'] / 1e9:.2f} GB {paging['store_precision']} store (one token needs "
                   f"{paging['min_cache_bytes'] / 1e9:.2f} GB)")
    est = p.decode_estimate()
    if est:
        click.echo(f"decode estimate (from bandwidth, not measured): at most {est['roofline_tokens_per_s']:.1f} tok/s; "
                   f"~{est['at_measured_fraction']:.1f} tok/s at the {est['measured_fraction']} of bandwidth dsexport "
                   "reaches on x86")


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--tensorrt", "versions", multiple=True,
              help="TensorRT version to check against (repeatable; default: every version the bundle's target ships).")
@click.option("--route", default="tensorrt", show_default=True, type=click.Choice(["tensorrt", "ort-tensorrt-ep"]),
              help="tensorrt: every node in the engine; ort-tensorrt-ep: ONNX Runtime runs non-ONNX ops on CUDA.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def check(bundle: Path, versions: tuple[str, ...], route: str, as_json: bool) -> None:
    """Static TensorRT compatibility check of a bundle's graphs (no TensorRT needed). Exit 1 if a node fails."""
    from dsexport.runtime.bundle import read_bundle
    from dsexport.targets import TARGETS
    from dsexport.targets.tensorrt_check import check_file

    b = read_bundle(bundle, verify=False)
    target = TARGETS.get(b.manifest["target"]["name"])
    if not versions:
        shipped = target.device.tensorrt if target and target.device else ()
        default = b.manifest.get("tensorrt", {}).get("checked_against") or (target.tensorrt_default if target else None)
        versions = tuple(dict.fromkeys([*shipped, *([default] if default else [])])) or ("10.3",)
    reports = []
    for role, graph in b.manifest["graphs"].items():
        path = b.directory / graph["file"]
        if path.suffix != ".onnx":
            raise UserError(f"{path}: not an ONNX graph ({path.suffix}); TensorRT parses ONNX")
        for version in versions:
            reports.append(check_file(path, version, route))
    ok = all(r.ok for r in reports)
    if as_json:
        click.echo(json.dumps({"bundle": str(bundle), "ok": ok, "reports": [r.to_json() for r in reports]}, indent=2))
    else:
        for r in reports:
            for line in r.lines():
                click.echo(line)
        click.echo(("PASSED" if ok else "FAILED") + f": {bundle}")
    if not ok:
        raise ValidationFailed()


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Rebuild engines that exist.")
def engine(bundle: Path, force: bool) -> None:
    """Build the bundle's TensorRT engines on this device (JetPack / TensorRT installed); docs/engine.md."""
    from dsexport.runtime.bundle import read_bundle
    from dsexport.targets.tensorrt_engine import build_engines

    b = read_bundle(bundle, verify=True)
    if "tensorrt" not in b.manifest:
        raise UserError(f"{bundle}: built for {b.manifest['target']['name']}, which has no TensorRT engine; "
                        "build with a TensorRT target (dsexport targets)")
    section = build_engines(b.directory, log=lambda text: click.echo(text, err=True), force=force)
    click.echo(f"built {', '.join(section['files'].values())} with TensorRT {section['tensorrt_version']} "
               f"for {section['gpu']} (SM {section['compute_capability']})")


class ValidationFailed(Exception):
    """The bundle ran but no longer is the model: exit code 1."""


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="Checkpoint to compare against (needs torch). Without it: the golden outputs in the bundle.")
@click.option("--data", type=click.Path(path_type=Path), default=None, help="Text or JSONL (\"text\") to evaluate on.")
@click.option("--samples", default=8, show_default=True, type=click.IntRange(1), help="Token windows to evaluate.")
@click.option("--seq-len", default=64, show_default=True, type=click.IntRange(2), help="Tokens per window.")
@click.option("--max-logit-diff", type=float, default=None, help="Fail above this max |logit difference|.")
@click.option("--min-top1", type=float, default=None, help="Fail below this top-1 agreement.")
@click.option("--max-ppl-delta", type=float, default=None, help="Fail above this relative perplexity change.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--junit", type=click.Path(path_type=Path), default=None, help="Also write JUnit XML here.")
@click.option("--threads", default=None, type=int)
@click.option("--backend", default="onnxruntime", show_default=True, type=click.Choice(["onnxruntime", "tensorrt"]),
              help="onnxruntime: the bundle's ONNX graphs (any machine); tensorrt: its engines, on the device.")
def validate(bundle: Path, reference: Path | None, data: Path | None, samples: int, seq_len: int,
             max_logit_diff: float | None, min_top1: float | None, max_ppl_delta: float | None, as_json: bool,
             junit: Path | None, threads: int | None, backend: str) -> None:
    """Check that a bundle still is the model. Exit 0 pass, 1 fail, 2 bad input, 3 cannot run here."""
    try:
        report = _run_validation(bundle, reference, data, samples, seq_len, max_logit_diff, min_top1,
                                 max_ppl_delta, threads, backend)
    except EngineUnavailable:
        raise
    except UserError as e:  # validate's contract: every input problem is exit code 2
        raise UserError(str(e)) from None
    if junit:
        report.write_junit(junit)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        click.echo(format_table(["check", "value", "limit", "result"],
                                [[c.name, f"{c.value:.6g}", ("<= " if c.kind == "max" else ">= ") + f"{c.limit:.6g}",
                                  "pass" if c.passed else "FAIL"] for c in report.checks]))
        click.echo(f"{'PASSED' if report.passed else 'FAILED'}: {bundle} ({report.mode}, "
                   f"{report.data['sequences']} sequences, {report.data['tokens']} tokens)")
    if not report.passed:
        raise ValidationFailed()


def _run_validation(bundle, reference, data, samples, seq_len, max_logit_diff, min_top1, max_ppl_delta, threads,
                    backend="onnxruntime"):
    import dataclasses

    from dsexport.runtime import Engine
    from dsexport.runtime.bundle import read_bundle
    from dsexport.runtime.validate import Thresholds, validate_golden

    manifest = read_bundle(bundle, verify=False).manifest
    # verifies checksums: a modified file is bad input, not a fail
    engine = Engine.load(bundle, threads=threads, backend=backend)
    # ONNX Runtime runs the graphs as exported; a TensorRT engine runs at the bundle's precision
    limits = Thresholds.for_bundle(manifest, backend)
    overrides = {"max_logit_diff": max_logit_diff, "min_top1": min_top1, "max_ppl_delta": max_ppl_delta}
    limits = dataclasses.replace(limits, **{k: v for k, v in overrides.items() if v is not None})
    if reference is None:
        return validate_golden(engine, limits.max_logit_diff)
    from dsexport.exporter.validate import validate_against_reference

    return validate_against_reference(engine, reference, data, limits, seq_len=seq_len, samples=samples)


def main() -> None:
    try:
        code = cli.main(standalone_mode=False)
    except ValidationFailed:
        sys.exit(1)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
