"""Round-to-nearest vs activation-aware scaling (`--quant-method awq`) at the same bytes.

    python benchmarks/awq_quality.py [--model CKPT] [--samples 64] [--seq-len 256] [--settings int4-b32 ...]
        [--json out.json]

For int4 (block 32 and 128) and int8, the perplexity of the reference model with the bundle's
dequantized weights (what the bundle computes; tests/test_quantize.py and tests/test_awq.py check
bundle = reference) on the held-out test splits beside the checkpoint, with round-to-nearest and
with AWQ scales searched on the embedded model's mixed English + code training text. AWQ is an
exact rewrite, so bytes per weight are identical; the cost is reported against fp32.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path


from dsexport import EMBEDDED_MODEL
from dsexport.calibration.awq import search_scales
from dsexport.calibration.data import load_sequences
from dsexport.core.quant import QuantSpec
from dsexport.exporter.awq import with_awq
from dsexport.exporter.checkpoint import CheckpointReader
from dsexport.exporter.reference import DeepseekReference
from dsexport.runtime.tokenizer import BundleTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_quality import CORPORA, DOMAINS, windows  # noqa: E402
from quantization_quality import perplexity  # noqa: E402

SETTINGS = {"int4-b32": ("int4", 32), "int4-b128": ("int4", 128), "int8-b32": ("int8", 32)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, default=EMBEDDED_MODEL)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    reader = CheckpointReader(args.model)
    cfg = reader.config
    test = {d: windows(args.model, d, args.seq_len) for d in DOMAINS}
    base = {d: perplexity(DeepseekReference.from_checkpoint(reader), test[d]) for d in DOMAINS}
    print(f"{args.model}: fp32 perplexity " + ", ".join(f"{d} {p:.3f}" for d, p in base.items()), flush=True)
    sequences, _ = load_sequences([CORPORA / f"{d}.train.txt" for d in DOMAINS],
                                  BundleTokenizer.from_directory(args.model), args.samples, args.seq_len)
    rows = []
    for name in args.settings:
        precision, block = SETTINGS[name]
        spec = QuantSpec.preset(precision, block).for_model(cfg.hidden_size, cfg.moe_intermediate_size)
        t0 = time.perf_counter()
        scales, records = search_scales(reader, sequences, dataclasses.replace(spec, method="awq"))
        search_s = time.perf_counter() - t0
        for method, view in (("rtn", reader), ("awq", with_awq(reader, scales))):
            model = DeepseekReference.from_checkpoint(view, spec)
            for d in DOMAINS:
                ppl = perplexity(model, test[d])
                rows.append({"setting": name, "method": method, "evaluated_on": d, "ppl": ppl,
                             "delta": ppl / base[d] - 1, "search_seconds": search_s if method == "awq" else 0.0,
                             "layers": {str(k): v for k, v in records.items()} if method == "awq" else None})
                print(f"{name:10s} {method}: {d:7s} ppl {ppl:8.3f} ({ppl / base[d] - 1:+.3%})", flush=True)
        print(f"{name}: AWQ search {search_s:.0f} s; per layer (input power, down power, output error rtn -> awq): " +
              "; ".join(f"{k}: {v['input_power']:.3g}, {v['down_power']:.3g}, {v['error_rtn']:.3g} -> "
                        f"{v['error_awq']:.3g}" for k, v in records.items()), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "baseline_ppl": base, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
