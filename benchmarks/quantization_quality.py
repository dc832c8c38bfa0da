"""Perplexity cost of int8 / int4 quantization on the embedded trained model.

    python benchmarks/quantization_quality.py [--json out.json]

Evaluates the reference model running the dequantized weights a quantized bundle computes with
(DeepseekReference.from_checkpoint(reader, QuantConfig): tests/test_quantize.py checks the
bundle against exactly that model) on the held-out test split shipped with the model, in
non-overlapping 256-token windows, English and code. Prints perplexity and its change relative
to fp32 per precision and block size, and the bytes of the weights each writes.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from dsexport import EMBEDDED_MODEL
from dsexport.exporter.checkpoint import CheckpointReader
from dsexport.exporter.config import weight_bytes
from dsexport.exporter.quantize import QuantConfig
from dsexport.exporter.reference import DeepseekReference
from dsexport.runtime.tokenizer import BundleTokenizer

DOMAINS = ("english", "code")


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    nll, count = 0.0, 0
    for b in range(0, windows.shape[0], 16):
        x = windows[b:b + 16]
        logp = torch.log_softmax(model(x)[:, :-1].double(), -1)
        nll -= logp.gather(-1, x[:, 1:, None]).sum().item()
        count += x[:, 1:].numel()
    return math.exp(nll / count)


def test_windows(seq_len: int = 256) -> dict[str, torch.Tensor]:
    tok = BundleTokenizer(EMBEDDED_MODEL)
    out = {}
    for d in DOMAINS:
        ids = tok.encode((EMBEDDED_MODEL / f"test.{d}.txt").read_text())
        n = len(ids) // seq_len
        out[d] = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    reader = CheckpointReader(EMBEDDED_MODEL)
    windows = test_windows()
    configs = [("fp32", None)] + [(f"{p} block {b}", QuantConfig.preset(p, b)) for p in ("int8", "int4")
                                  for b in (32, 64, 128)]
    configs.append(("int4 block 32, lm_head int4", QuantConfig.preset("int4", 32, {"lm_head": 4})))
    rows, base = [], {}
    for label, quant in configs:
        model = DeepseekReference.from_checkpoint(reader, quant)
        ppl = {d: perplexity(model, w) for d, w in windows.items()}
        if quant is None:
            base = ppl
        total, _ = weight_bytes(reader.config, quant.bits if quant else {}, quant.block_size if quant else 32)
        row = {"config": label, "weight_bytes": total, **{f"ppl_{d}": p for d, p in ppl.items()},
               **{f"delta_{d}": p / base[d] - 1 for d, p in ppl.items()}}
        rows.append(row)
        print(f"{label:30s} {total / 1e6:6.2f} MB  " + "  ".join(
            f"{d} {ppl[d]:.3f} ({ppl[d] / base[d] - 1:+.2%})" for d in DOMAINS), flush=True)
    if args.json:
        open(args.json, "w").write(json.dumps({"windows": {d: int(w.shape[0]) for d, w in windows.items()},
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
