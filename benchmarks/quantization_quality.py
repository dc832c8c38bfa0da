"""Perplexity cost of int8 / int4 quantization on the embedded trained model.

    python benchmarks/quantization_quality.py [--json out.json] [--model DIR] [--configs LABEL ...]

Evaluates the reference model running the dequantized weights a quantized bundle computes with
(DeepseekReference.from_checkpoint(reader, QuantConfig): tests/test_quantize.py checks the
bundle against exactly that model) on the held-out test split shipped with the model, in
non-overlapping 256-token windows, English and code. Prints perplexity and its change relative
to fp32 per precision and block size, and the bytes of the weights each writes.
"""

from __future__ import annotations

import argparse
import dataclasses as dc
import json
import math
import sys
from pathlib import Path

import torch

from dsexport import EMBEDDED_MODEL
from dsexport.exporter.checkpoint import CheckpointReader
from dsexport.core.quant import weight_bytes
from dsexport.exporter.quantize import QuantConfig
from dsexport.exporter.reference import DeepseekReference
from dsexport.runtime.tokenizer import BundleTokenizer

DOMAINS = ("english", "code")
sys.path.insert(0, str(Path(__file__).resolve().parent))


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    nll, count = 0.0, 0
    for b in range(0, windows.shape[0], 16):
        x = windows[b:b + 16]
        logp = torch.log_softmax(model(x)[:, :-1].double(), -1)
        nll -= logp.gather(-1, x[:, 1:, None]).sum().item()
        count += x[:, 1:].numel()
    return math.exp(nll / count)


def reference_with(reader: CheckpointReader, kept: dict | None = None, quant=None) -> DeepseekReference:
    """The reference model with a pruning plan (kept experts) and/or quantization applied."""
    base = reader.config
    reader.config = base.with_kept_experts(kept)
    try:
        return DeepseekReference.from_checkpoint(reader, quant)
    finally:
        reader.config = base


def test_windows(seq_len: int = 256, model: Path = EMBEDDED_MODEL) -> dict[str, torch.Tensor]:
    tok = BundleTokenizer.from_directory(model)
    out = {}
    for d in DOMAINS:
        ids = tok.encode((model / f"test.{d}.txt").read_text())
        n = len(ids) // seq_len
        out[d] = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
    return out


def bundle_bytes(cfg, quant) -> int:
    """Weight bytes as the quantizer writes them (per-expert widths included)."""
    return weight_bytes(cfg, quant)[0]


def mixed_configs(reader) -> list:
    """Per-expert widths from a calibration on the model's training text (both corpora):
    int4 with the top quarter of experts at int8; and at uniform int4's bytes, the lowest-scoring
    12.5% pruned and the bytes saved spent on int8 for the top experts."""
    import dataclasses as dc
    import tempfile

    from pruning_quality import train_corpora

    from dsexport.calibration.run import calibrate
    from dsexport.calibration.pruning import PruneConfig, plan_expert_bits, plan_pruning

    with tempfile.TemporaryDirectory() as work:
        corpora = train_corpora(Path(work))
        profile = calibrate(EMBEDDED_MODEL, [corpora["english"], corpora["code"]], 256, 256)
    cfg = reader.config
    int4 = QuantConfig.preset("int4", 32).for_model(cfg.hidden_size, cfg.moe_intermediate_size)
    top = dc.replace(int4, expert_bits=plan_expert_bits(cfg, profile, 8, 0.25))
    pruned = plan_pruning(cfg, profile, PruneConfig(0.125, "output-mass", "global"))
    # an int8 expert costs (1 + 4/32) / (0.5 + 4/32) = 1.8 int4 experts: each pruned one pays for 1/0.8 upgrades
    same_bytes = dc.replace(int4, expert_bits=plan_expert_bits(cfg, profile, 8, 0.125 / 0.8 * 0.875 / 0.875,
                                                                 kept=pruned.kept))
    # per part: the dense first layer (int4's largest loss per byte, measured) at int8, paid for by
    # the routed experts' block 64 (one fp32 scale per 64 weights instead of 32)
    dense8 = dc.replace(QuantConfig.preset("int4", 32, {"dense_mlp": 8}), expert_block_size=64)
    # and the shared experts too (next by loss per byte), paid for by the routed experts' block 128
    dense8_shared8 = dc.replace(QuantConfig.preset("int4", 32, {"dense_mlp": 8, "shared_experts": 8}),
                                expert_block_size=128)
    return [("int4, top 25% experts int8", top),
            ("int4, 12.5% pruned, top experts int8 (= int4 bytes)", same_bytes, pruned.kept),
            ("int4, dense MLP int8, experts block 64 (= int4 bytes)",
             dense8.for_model(cfg.hidden_size, cfg.moe_intermediate_size)),
            ("int4, dense MLP + shared experts int8, experts block 128 (= int4 bytes)",
             dense8_shared8.for_model(cfg.hidden_size, cfg.moe_intermediate_size))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    parser.add_argument("--model", type=Path, default=EMBEDDED_MODEL,
                        help="a checkpoint with test.english.txt and test.code.txt beside it (the embedded model's "
                             "layout; models/deepseek-specialized has them too)")
    parser.add_argument("--configs", nargs="+", default=None, metavar="LABEL",
                        help="only these configurations (their labels as printed; fp32 always runs)")
    args = parser.parse_args()
    reader = CheckpointReader(args.model)
    windows = test_windows(model=args.model)
    configs = [("fp32", None)] + [(f"{p} block {b}", QuantConfig.preset(p, b)) for p in ("int8", "int4")
                                  for b in (32, 64, 128)]
    configs.append(("int4 block 32, lm_head int4", QuantConfig.preset("int4", 32, {"lm_head": 4})))
    # the output head at 6 bits (stored as 8-bit rows; the native decoder reads 0.75 bytes a weight)
    configs.append(("int4 block 32, lm_head int6", QuantConfig.preset("int4", 32, {"lm_head": 6})))
    configs.append(("int8 block 32, lm_head int6", QuantConfig.preset("int8", 32, {"lm_head": 6})))
    # the choices around int4: exact fp32 activations, zero points, and TensorRT's Q/DQ weights
    # (symmetric, positive scales, int8 parts per channel, fp activations)
    configs.append(("int4 block 32, fp32 activations", QuantConfig.preset("int4", 32, activations="fp32")))
    configs.append(("int4 block 32, zero points", dc.replace(QuantConfig.preset("int4", 32), scheme="asymmetric")))
    configs.append(("int4 TensorRT Q/DQ", dc.replace(QuantConfig.preset("int4", 32, activations="fp32"),
                                                     scheme="symmetric", per_channel_bits=(8,), lowering="qdq")))
    configs.append(("int8 TensorRT Q/DQ", dc.replace(QuantConfig.preset("int8", 32, activations="fp32"),
                                                     scheme="symmetric", per_channel_bits=(8,), lowering="qdq")))
    if args.configs is None:
        configs += mixed_configs(reader)
    else:
        unknown = set(args.configs) - {label for label, *_ in configs}
        if unknown:
            parser.error(f"unknown configurations {sorted(unknown)}")
        configs = [c for c in configs if c[0] == "fp32" or c[0] in args.configs]
    cfg = reader.config
    configs = [(label, quant.for_model(cfg.hidden_size, cfg.moe_intermediate_size) if quant else None, *kept)
               for label, quant, *kept in configs]
    rows, base = [], {}
    for label, quant, *kept in configs:
        kept = kept[0] if kept else None
        model = reference_with(reader, kept, quant)
        total = bundle_bytes(reader.config.with_kept_experts(kept), quant)
        ppl = {d: perplexity(model, w) for d, w in windows.items()}
        if quant is None:
            base = ppl
        row = {"config": label, "weight_bytes": total, **{f"ppl_{d}": p for d, p in ppl.items()},
               **{f"delta_{d}": p / base[d] - 1 for d, p in ppl.items()}}
        rows.append(row)
        print(f"{label:30s} {total / 1e6:6.2f} MB  " + "  ".join(
            f"{d} {ppl[d]:.3f} ({ppl[d] / base[d] - 1:+.2%})" for d in DOMAINS), flush=True)
    if args.json:
        open(args.json, "w").write(json.dumps({"model": str(args.model),
                                               "windows": {d: int(w.shape[0]) for d, w in windows.items()},
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
