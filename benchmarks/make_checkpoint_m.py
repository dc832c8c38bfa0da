"""Write checkpoint M: a random DeepSeek-V3-routed model shaped like DeepSeek-V2-Lite scaled down.

hidden 1024, 12 layers (first dense), 64 routed experts top-6 (8 groups, 4 kept), 2 shared,
moe_intermediate 512, intermediate 2816, 8 heads, kv_lora_rank 256, qk_nope 64, qk_rope 32,
v_head 64, no q-LoRA, vocab 32000: 1.24B parameters, 203M read per decoded token. fp32
safetensors (~5 GB), written by transformers' own DeepseekV3ForCausalLM.

    python benchmarks/make_checkpoint_m.py /tmp/ckpt-m
    python benchmarks/make_checkpoint_m.py /tmp/ckpt-m --mtp   # adds mtp.safetensors (below)

--mtp adds an MTP module (docs/mtp.md) in DeepSeek's layout, model.layers.{L}: its decoder layer a
copy of the last layer's weights, enorm/hnorm ones, eh_proj random, shared_head.norm the final
norm's. Its predictions mean nothing (random weights: drafts are rarely accepted); it is there to
time drafting's costs on a model of M's size (benchmarks/step_cost.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

M = dict(
    model_type="deepseek_v3", vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
    num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=8, kv_lora_rank=256, qk_nope_head_dim=64,
    qk_rope_head_dim=32, v_head_dim=64, q_lora_rank=None, n_routed_experts=64, n_shared_experts=2,
    num_experts_per_tok=6, n_group=8, topk_group=4, first_k_dense_replace=1, routed_scaling_factor=2.5,
    norm_topk_prob=True, max_position_embeddings=4096, rope_interleave=True,
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--mtp", action="store_true", help="also write mtp.safetensors (an MTP module for timing)")
    args = ap.parse_args()
    from dsexport.exporter.synthetic import write_checkpoint

    if (args.out / "config.json").is_file():
        print(f"{args.out} exists; keeping it", file=sys.stderr)
        if args.mtp:
            write_mtp(args.out)
        return
    write_checkpoint(args.out, dict(M, num_hidden_layers=args.layers), seed=0, scale=0.02)
    size = sum(p.stat().st_size for p in args.out.glob("*.safetensors"))
    print(f"wrote {args.out} ({size / 1e9:.2f} GB of safetensors)")
    if args.mtp:
        write_mtp(args.out)


def write_mtp(out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from dsexport.exporter.checkpoint import CheckpointReader

    reader = CheckpointReader(out)
    cfg = reader.config
    L, D = cfg.num_hidden_layers, cfg.hidden_size
    if f"model.layers.{L}.eh_proj.weight" in reader:
        print(f"{out} already has MTP weights", file=sys.stderr)
        return
    last = f"model.layers.{L - 1}."
    tensors = {f"model.layers.{L}." + k[len(last):]: reader.raw(k).clone() for k in reader.keys() if k.startswith(last)}
    g = torch.Generator().manual_seed(1)
    tensors.update({f"model.layers.{L}.enorm.weight": torch.ones(D), f"model.layers.{L}.hnorm.weight": torch.ones(D),
                    f"model.layers.{L}.eh_proj.weight": 0.02 * torch.randn(D, 2 * D, generator=g),
                    f"model.layers.{L}.shared_head.norm.weight": reader.raw("model.norm.weight").clone()})
    save_file(tensors, str(out / "mtp.safetensors"))
    print(f"wrote {out / 'mtp.safetensors'} ({len(tensors)} tensors)")


if __name__ == "__main__":
    main()
