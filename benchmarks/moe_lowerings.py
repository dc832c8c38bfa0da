"""Time one MoE layer under each registered lowering, fp32, with ONNX Runtime on N threads.

The layer is shaped like checkpoint M's (hidden 1024, 64 routed experts top-6, moe_intermediate
512, noaux_tc routing with 8 groups), weights random, held in memory. Prints ms per call for
decode (1 token) and prefill-sized inputs, and for one token the fraction of the copy-bandwidth
floor: bytes of the 6 routed experts' weights / measured 2-thread copy bandwidth.

    python benchmarks/moe_lowerings.py [--threads 2] [--repeats 50]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from bandwidth import copy_bandwidth
import onnxruntime as ort
from onnx import TensorProto

from dsexport.core.config import parse_config
from dsexport.exporter.graph import GraphBuilder
from dsexport.exporter.lowering import MOE_LOWERINGS, ExpertWeights, LoweringOptions

CONFIG = dict(model_type="deepseek_v3", vocab_size=32000, hidden_size=1024, intermediate_size=2816,
              moe_intermediate_size=512, num_hidden_layers=2, num_attention_heads=8, kv_lora_rank=256,
              qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, q_lora_rank=None, n_routed_experts=64,
              n_shared_experts=2, num_experts_per_tok=6, n_group=8, topk_group=4, first_k_dense_replace=1,
              routed_scaling_factor=2.5, norm_topk_prob=True)


def build_layer(lowering: str, weights: ExpertWeights, cfg, out: Path, shards: int = 1) -> Path:
    tag = f"{lowering}-{shards}"
    g = GraphBuilder(out / f"{tag}.onnx.data")
    x = g.input("x", TensorProto.FLOAT, ["tokens", cfg.hidden_size])
    logits = g.linear(x, weights.router, "moe.router")
    y = MOE_LOWERINGS[lowering].emit(g, x, logits, weights, cfg, "moe", LoweringOptions(moe_shards=shards))
    g.output(y, "y", TensorProto.FLOAT, ["tokens", cfg.hidden_size])
    g.save(out / f"{tag}.onnx", "moe_layer")
    return out / f"{tag}.onnx"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=64)
    args = ap.parse_args()
    cfg = parse_config(CONFIG)
    rng = np.random.default_rng(0)
    E, I, D = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    w = ExpertWeights(
        router=rng.standard_normal((E, D), np.float32) * 0.05, bias=rng.standard_normal(E).astype(np.float32) * 0.1,
        gate=rng.standard_normal((E, I, D), np.float32) * 0.03, up=rng.standard_normal((E, I, D), np.float32) * 0.03,
        down=rng.standard_normal((E, D, I), np.float32) * 0.03,
    )
    bandwidth = copy_bandwidth(args.threads)
    expert_bytes = cfg.num_experts_per_tok * 3 * I * D * 4
    floor_ms = expert_bytes / bandwidth * 1e3
    print(f"copy bandwidth ({args.threads} threads): {bandwidth / 1e9:.1f} GB/s; "
          f"routed expert bytes per token {expert_bytes / 1e6:.1f} MB -> floor {floor_ms:.2f} ms")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    # Decode inputs differ call to call, so the routed experts (and the bytes read) change as
    # in a real model; repeating one input would let the CPU cache serve the same 6 experts.
    inputs = {1: [rng.standard_normal((1, D)).astype(np.float32) for _ in range(64)],
              16: [rng.standard_normal((16, D)).astype(np.float32) for _ in range(4)],
              128: [rng.standard_normal((128, D)).astype(np.float32) for _ in range(2)]}
    variants = [("ort-moe", 1), ("ort-moe", 2), ("gather", 1), ("dense", 1)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, shards in variants:
            label = f"{name} x{shards}" if name == "ort-moe" else name
            path = build_layer(name, w, cfg, Path(tmp), shards)
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            for tokens, xs in inputs.items():
                results.setdefault(tokens, {})[label] = session.run(None, {"x": xs[0]})[0]
                reps = max(len(xs), args.repeats // max(1, tokens // 8))
                t0 = time.perf_counter()
                for i in range(reps):
                    session.run(None, {"x": xs[i % len(xs)]})
                ms = (time.perf_counter() - t0) / reps * 1e3
                extra = f"  {floor_ms / ms:.2f} of the bandwidth floor" if tokens == 1 else ""
                print(f"{label:11s} tokens={tokens:4d}: {ms:8.2f} ms per call{extra}")
    for tokens, ys in results.items():
        base = ys["ort-moe x1"]
        print(f"max |difference| from ort-moe x1 at {tokens} tokens: "
              + ", ".join(f"{k} {np.abs(v - base).max():.1e}" for k, v in ys.items() if k != "ort-moe x1"))


if __name__ == "__main__":
    main()
