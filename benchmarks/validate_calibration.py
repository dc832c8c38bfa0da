"""How `dsexport validate --reference` separates correct bundles from wrong ones: the statistics of
every bundle the project builds correctly, and of bundles built from corrupted checkpoints.

    python benchmarks/validate_calibration.py --model src/dsexport/assets/deepseek-tiny --out /tmp/vcal [--json F]

For each precision / block / activation setting it builds the correct bundle and three wrong
ones (o_proj of one layer perturbed by 5% noise, two experts' weights swapped, one router row
replaced) and runs `validate --reference` on the checkpoint's own held-out text when it has
one (test.*.txt), printing the exactness statistics (docs/validate.md) and the verdicts. The
thresholds in runtime/validate.py were chosen from this table: every correct bundle passes,
every corrupted one fails.

With --prune F ...: a bundle with that fraction of routed experts removed (frequency, global
scope, calibrated on the training text of the embedded model's corpora), validated against the
unpruned checkpoint: it must pass every exactness check (it computes the pruned model exactly)
and its quality verdict reports the perplexity it lost against the original model, failing
past the precision's budget (runtime/validate.py QUALITY_BUDGETS).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dsexport.build import BuildConfig, build_bundle
from dsexport.core.config import load_config
from dsexport.exporter.validate import validate_against_reference
from dsexport.runtime import Engine
from dsexport.runtime.validate import Thresholds

SETTINGS = {  # name -> build flags
    "fp32": {},
    "int8": {"precision": "int8"},
    "int4-b32": {"precision": "int4"},
    "int4-b64": {"precision": "int4", "block_size": 64},
    "int4-b128": {"precision": "int4", "block_size": 128},
    "int4-fp32-act": {"precision": "int4", "activations": "fp32"},
    "int4-zero-points": {"precision": "int4", "zero_points": True},
    "int4-mixed": {"precision": "int4", "quantize": {"dense_mlp": 8, "shared_experts": 8}, "expert_block_size": 128},
}
STATS = ("max_abs_logit_diff", "median_abs_logit_diff", "p99_abs_logit_diff", "worst_expert_median_logit_diff",
         "latent_agreement", "top1_agreement", "kl_mean", "perplexity_delta_rel")


def corruptions(cfg) -> dict:
    moe = next(i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i))
    dense = 0 if not cfg.is_moe_layer(0) else moe

    def perturb(t):
        name = f"model.layers.{dense}.self_attn.o_proj.weight"
        w = t[name].float()
        t[name] = (w + 0.05 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(0))).to(t[name].dtype)

    def swap(t):
        p = f"model.layers.{moe}.mlp.experts."
        for proj in ("gate_proj", "up_proj", "down_proj"):
            a, b = f"{p}0.{proj}.weight", f"{p}1.{proj}.weight"
            t[a], t[b] = t[b].clone(), t[a].clone()

    def router(t):
        name = f"model.layers.{moe}.mlp.gate.weight"
        w = t[name].float().clone()
        w[1] = torch.randn(w.shape[1], generator=torch.Generator().manual_seed(1)) * w.std()
        t[name] = w.to(t[name].dtype)

    return {"perturbed-o_proj": perturb, "swapped-experts": swap, "changed-router-row": router}


def corrupt(src: Path, dst: Path, change) -> Path:
    if dst.exists():
        return dst
    shutil.copytree(src, dst)
    for shard in dst.glob("*.safetensors"):
        tensors = load_file(str(shard))
        change(tensors)
        save_file(tensors, str(shard), metadata={"format": "pt"})
    return dst


def measure(bundle: Path, checkpoint: Path, data: Path | None, samples: int, seq_len: int) -> dict:
    engine = Engine.load(bundle, threads=2)
    report = validate_against_reference(engine, checkpoint, data, Thresholds.for_bundle(engine.manifest),
                                        seq_len=seq_len, samples=samples, greedy_prompts=1)
    return {**{k: report.metrics.get(k) for k in STATS}, "passed": report.passed,
            "failed": [c.name for c in report.checks if not c.passed],
            "quality_loss_rel": (report.metrics.get("quality") or {}).get("quality_loss_rel")}


def pruned_rows(args, data: Path | None) -> list[dict]:
    """Pruned bundles: exact against the pruned reference, judged for quality against the original."""
    if not args.prune:
        return []
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from pruning_quality import DOMAINS, train_corpora

    from dsexport.calibration.pruning import PruneConfig
    from dsexport.calibration.run import calibrate

    corpora = train_corpora(args.out)
    profile = calibrate(args.model, [corpora[d] for d in DOMAINS], 64, 256)
    rows = []
    for fraction in args.prune:
        for name in ("fp32", "int4-b32"):
            out = args.out / f"{name}-pruned{fraction:g}"
            if not (out / "manifest.json").is_file():
                build_bundle(BuildConfig(args.model, out, prune=PruneConfig(fraction, "frequency"), **SETTINGS[name]),
                             profile=profile)
            row = {"setting": name, "bundle": f"pruned-{fraction:g}-frequency",
                   **measure(out, args.model, data, args.samples, args.seq_len)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS))
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--prune", type=float, nargs="*", default=[], help="also pruned bundles (fp32, int4)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    cfg = load_config(args.model)
    data = next(iter(sorted(args.model.glob("test.*.txt"))), None)
    rows = []
    for name in args.settings:
        for kind, change in [("correct", None), *corruptions(cfg).items()]:
            ckpt = args.model if change is None else corrupt(args.model, args.out / f"ckpt-{kind}", change)
            out = args.out / f"{name}-{kind}"
            if not (out / "manifest.json").is_file():
                build_bundle(BuildConfig(ckpt, out, **SETTINGS[name]))
            row = {"setting": name, "bundle": kind, **measure(out, args.model, data, args.samples, args.seq_len)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    rows += pruned_rows(args, data)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    bad = [r for r in rows if r["passed"] != (r["bundle"] == "correct") and not r["bundle"].startswith("pruned")]
    bad += [r for r in rows if r["bundle"].startswith("pruned") and set(r["failed"]) - {"quality_loss_rel"}]
    print(f"{len(rows)} bundles; {len(bad)} misjudged" + "".join(f"\n  {r['setting']} {r['bundle']}: {r['failed']}"
                                                            for r in bad))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
