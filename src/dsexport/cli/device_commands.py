"""Device-side commands: `run`, `inspect`, `targets`, `check`, `engine`, `validate`. They run on a
runtime-only install (no torch, no onnx), except `validate --reference` (needs torch) and
`check` of a TensorRT version the build did not check (needs onnx)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import click

from dsexport.core.errors import EngineUnavailable, NumericalError, UserError

from ..table import format_table, human_bytes
from .app import ValidationFailed, cli, require_build_side
from .inspect_output import inspect_summary, print_summary


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
             f"{s['prefetches']['used']} used before eviction, {s['prefetches']['late']} still loading when needed",
             f"decoder: {s.get('decoder', 'onnxruntime segments')}; routed experts: {s['routed_experts']}"]
    for layer, counts in s["expert_histograms"].items():
        top = sorted(range(len(counts)), key=lambda e: -counts[e])[:6]
        lines.append(f"layer {layer}: {sum(counts)} requests over {sum(1 for c in counts if c)} experts; most: "
                     + ", ".join(f"{e}x{counts[e]}" for e in top if counts[e]))
    return lines


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="Prompt text (special-token strings in it stay text; see --parse-special).")
@click.option("--chat", is_flag=True, help="Wrap the prompt as a user message with the bundle's chat template.")
@click.option("--parse-special", is_flag=True, help="Turn special-token strings in the prompt into control tokens.")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(1))
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy.")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(0), help="0 = off.")
@click.option("--top-p", default=1.0, show_default=True, type=float, help="1 = off.")
@click.option("--repetition-penalty", default=1.0, show_default=True, type=float, help="1 = off.")
@click.option("--seed", default=None, type=int)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--threads", default=None, type=click.IntRange(1, 1024), help="ONNX Runtime intra-op threads (default: all cores).")
@click.option("--max-context", default=None, type=click.IntRange(2), help="Context limit in tokens (default: the model's).")
@click.option("--weights", default="mmap", show_default=True, type=click.Choice(["mmap", "mlock", "memory"]),
              help="How weights are held: mapped, mapped and locked in RAM, or read into memory.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the bundle's files (never the confinement).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@click.option("--backend", default="onnxruntime", show_default=True, type=click.Choice(["onnxruntime", "tensorrt"]),
              help="Run the ONNX graphs with ONNX Runtime, or the engines `dsexport engine` built on this device.")
@click.option("--expert-cache-mb", default=None, type=float,
              help="Paged bundles: MiB of routed experts kept resident (default: the bundle's; docs/paging.md).")
@click.option("--cache-policy", default=None, type=click.Choice(["lfu", "lru"]),
              help="Paged bundles: expert eviction policy (default: lfu).")
@click.option("--no-prefetch", is_flag=True, help="Paged bundles: do not load predicted experts ahead.")
@click.option("--stats", is_flag=True, help="Paged bundles: print expert-cache statistics of the generation.")
@click.option("--draft", type=click.Choice(["mtp", "auto"]), default="auto", show_default=True,
              help="mtp: draft with the bundle's MTP graph and verify two tokens per decoder run; auto: do so when "
                   "a measurement at load predicts a speedup on this machine (docs/mtp.md). Prints drafting statistics.")
@click.option("--no-draft", is_flag=True, help="Decode one token per decoder run.")
def run(bundle, prompt, chat, parse_special, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop,
        threads, max_context, weights, no_verify, as_json, backend, expert_cache_mb, cache_policy, no_prefetch, stats,
        draft=None, no_draft=False) -> None:
    """Generate text from a bundle."""
    from dsexport.runtime import Engine

    if draft == "mtp" and no_draft:
        raise UserError("--draft and --no-draft contradict each other; pass one")
    engine = Engine.load(bundle, threads=threads, max_context=max_context, weights=weights, verify=not no_verify,
                         backend=backend, expert_cache_mb=expert_cache_mb, cache_policy=cache_policy,
                         prefetch=not no_prefetch, draft=None if no_draft else draft)
    paged = hasattr(engine.backend, "stats")
    if stats and not paged:
        raise UserError(f"{bundle} is not a paged bundle: --stats reports expert paging (build --paged)")
    ids = (engine.encode_chat([{"role": "user", "content": prompt}]) if chat
           else engine.encode(prompt, parse_special=parse_special))
    kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                  repetition_penalty=repetition_penalty, seed=seed, stop=list(stop))
    if as_json:
        result = engine.generate(ids, **kwargs)
        click.echo(json.dumps({
            "prompt_ids": result.prompt_ids, "output_ids": result.output_ids, "text": result.text,
            "finish_reason": result.finish_reason, "ttft_s": result.ttft_s,
            "prefill_tokens_per_s": result.prefill_tokens_per_s, "decode_tokens_per_s": result.decode_tokens_per_s,
            **({"paging_stats": result.paging_stats} if stats else {}),
            **({"draft": result.draft_stats.to_json()} if result.draft_stats else {}),
            **({"draft_decision": engine.draft_decision.to_json()} if engine.draft_decision else {}),
        }))
        return
    for event in engine.stream(ids, **kwargs):
        click.echo(event.text, nl=False)
        sys.stdout.flush()
    click.echo()
    if stats:
        for line in paging_lines(engine.backend.stats()):
            click.echo(line, err=True)
    if engine.last_draft_stats is not None:
        click.echo(engine.last_draft_stats.summary(), err=True)


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--verify", is_flag=True, help="Also check every file's sha256.")
def inspect(bundle: Path, as_json: bool, verify: bool) -> None:
    """Describe a bundle: architecture, experts per layer, precision, sizes, cache per token."""
    from dsexport.runtime.bundle import read_bundle

    manifest = read_bundle(bundle, verify=verify).manifest
    s = inspect_summary(manifest)
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    print_summary(s)
    if manifest.tensorrt is not None:
        from .build_commands import tensorrt_summary

        click.echo()
        for line in tensorrt_summary(manifest):
            click.echo(line)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def targets(as_json: bool) -> None:
    """List the device targets (`jetson` and `jetson-orin-nano` resolve to jetson-orin-nano-8gb)."""
    from dsexport.targets import TARGETS

    items = [dataclasses.asdict(t) for t in TARGETS.values()]
    if as_json:
        click.echo(json.dumps(items, indent=2))
        return
    rows = []
    for t in items:
        d = t["device"]
        rows.append([t["name"], t["backend"], ",".join(t["precisions"]), t["moe_lowering"],
                     f"{d['usable_gb']:g}/{d['memory_gb']:g} GB" if d else "host",
                     f"{d['bandwidth_gbs']:g} GB/s" if d else "host", "yes" if t["buildable"] else "plan only"])
    click.echo(format_table(["target", "backend", "precisions", "MoE lowering", "usable/total", "bandwidth", "build"], rows))


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

    b = read_bundle(bundle, verify=False)
    m = b.manifest
    target = TARGETS.get(m.target.name)
    if not versions:
        shipped = target.device.tensorrt if target and target.device else ()
        default = m.tensorrt.checked_against if m.tensorrt else (target.tensorrt_default if target else None)
        versions = tuple(dict.fromkeys([*shipped, *([default] if default else [])])) or ("10.3",)
    decoder = m.graphs.decoder
    files = [s.file for s in decoder.segments] if decoder.paged else [decoder.file]
    for name in files:
        if not name.endswith(".onnx"):
            raise UserError(f"{b.directory / name}: not an ONNX graph; TensorRT parses ONNX")
    reports = _check_reports(b, files, versions, route)
    ok = all(r["ok"] for r in reports)
    if as_json:
        click.echo(json.dumps({"bundle": str(bundle), "ok": ok, "reports": reports}, indent=2))
    else:
        for r in reports:
            for line in r["lines"]:
                click.echo(line)
        click.echo(("PASSED" if ok else "FAILED") + f": {bundle}")
    if not ok:
        raise ValidationFailed()


def _check_reports(bundle, files: list[str], versions, route: str) -> list[dict]:
    """The parser check of each graph against each version: with onnx installed, computed now;
    without it (a runtime-only install), the build's own results where it checked that version."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        recorded = bundle.manifest.tensorrt.checks if bundle.manifest.tensorrt else {}
        missing = [v for v in versions if v not in recorded]
        if missing or route != "tensorrt":
            raise UserError(f"checking against TensorRT {', '.join(missing) or route} needs the onnx package "
                            "(pip install onnx); the bundle records the build's checks for "
                            f"{', '.join(recorded) or 'no version'}")
        return [{"graph": files[0], "tensorrt": v, "route": route, "nodes": r["nodes"], "ok": r["ok"],
                 "errors": r["errors"], "recorded_at_build": True,
                 "lines": [f"{files[0]}: TensorRT {v}: {r['nodes']} nodes, "
                           + ("every node parseable" if r["ok"] else f"{len(r['errors'])} not parseable")
                           + " (recorded at build; install onnx to re-check)"]}
                for v in versions for role, r in recorded[v].items()]
    from dsexport.targets.tensorrt_check import check_file

    reports = []
    for name in files:
        path = bundle.path(name, "graphs.decoder")
        for version in versions:
            report = check_file(path, version, route)
            reports.append({**report.to_json(), "lines": report.lines()})
    return reports


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Rebuild engines that exist.")
def engine(bundle: Path, force: bool) -> None:
    """Build the bundle's TensorRT engines on this device (JetPack / TensorRT installed); docs/engine.md."""
    from dsexport.runtime.bundle import read_bundle
    from dsexport.targets.tensorrt_engine import build_engines

    b = read_bundle(bundle, verify=True)
    if b.manifest.tensorrt is None:
        raise UserError(f"{bundle}: built for {b.manifest.target.name}, which has no TensorRT engine; "
                        "build with a TensorRT target (dsexport targets)")
    section = build_engines(b.directory, log=lambda text: click.echo(text, err=True), force=force)
    click.echo(f"built {', '.join(section.files.values())} with TensorRT {section.tensorrt_version} "
               f"for {section.gpu} (SM {section.compute_capability})")


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
@click.option("--max-quality-loss", type=float, default=None,
              help="Compressed bundles: fail when perplexity exceeds the original model's by more than this fraction "
                   "(default by the narrowest weights: 0.5% unquantized, 1% int8, 3% int4; docs/validate.md).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--junit", type=click.Path(path_type=Path), default=None, help="Also write JUnit XML here.")
@click.option("--threads", default=None, type=click.IntRange(1, 1024))
@click.option("--backend", default="onnxruntime", show_default=True, type=click.Choice(["onnxruntime", "tensorrt"]),
              help="onnxruntime: the bundle's ONNX graphs (any machine); tensorrt: its engines, on the device.")
def validate(bundle, reference, data, samples, seq_len, max_logit_diff, min_top1, max_ppl_delta, max_quality_loss,
             as_json, junit, threads, backend) -> None:
    """Check that a bundle still is the model. Exit 0 pass, 1 fail, 2 bad input, 3 cannot run here."""
    try:
        if reference is not None:
            require_build_side("validate --reference")
        report = _run_validation(bundle, reference, data, samples, seq_len, max_logit_diff, min_top1, max_ppl_delta,
                                 max_quality_loss, threads, backend)
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


def _run_validation(bundle, reference, data, samples, seq_len, max_logit_diff, min_top1, max_ppl_delta,
                    max_quality_loss, threads, backend):
    from dsexport.runtime import Engine
    from dsexport.runtime.golden import validate_golden
    from dsexport.runtime.validate import Thresholds, failed_report, quality_budget

    engine = Engine.load(bundle, threads=threads, backend=backend)  # a modified file is bad input, not a fail
    limits = Thresholds.for_bundle(engine.manifest, backend)
    overrides = {"max_logit_diff": max_logit_diff, "min_top1": min_top1, "max_ppl_delta": max_ppl_delta}
    limits = dataclasses.replace(limits, **{k: v for k, v in overrides.items() if v is not None})
    try:
        if reference is None:
            m = engine.manifest
            compressed = m.quantization is not None or m.model.kept_experts is not None
            budget = max_quality_loss if max_quality_loss is not None else quality_budget(m) if compressed else None
            return validate_golden(engine, limits, budget)
        from dsexport.exporter.validate import validate_against_reference

        return validate_against_reference(engine, reference, data, limits, seq_len=seq_len, samples=samples,
                                          max_quality_loss=max_quality_loss)
    except NumericalError as e:  # the bundle computes NaN/Inf: it is not the model
        return failed_report(engine, "reference" if reference else "golden", str(e))
    except EngineUnavailable:
        raise
