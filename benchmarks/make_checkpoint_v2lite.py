"""Write a random checkpoint with DeepSeek-V2-Lite's exact configuration (15.7B parameters, bf16).

Streams one decoder layer at a time into its own safetensors shard (plus an index), so writing
it needs about one layer of memory, not the model's 31 GB. Tensor names and shapes are those of
transformers' DeepseekV2ForCausalLM built on the meta device, with the routed experts saved per
expert as the released checkpoint stores them. Weights ~ N(0, 0.02), norms 1.

    python benchmarks/make_checkpoint_v2lite.py /tmp/ckpt-v2lite
    /usr/bin/time -v dsexport build --model /tmp/ckpt-v2lite --target x86-cpu --precision int4 --out /tmp/v2lite-int4
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400,
    "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
    "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
    "num_experts_per_tok": 6, "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "qk_nope_head_dim": 128, "topk_method": "greedy", "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
    "moe_layer_freq": 1, "norm_topk_prob": False, "routed_scaling_factor": 1.0, "scoring_func": "softmax",
    "rms_norm_eps": 1e-6, "rope_theta": 10000, "max_position_embeddings": 163840, "tie_word_embeddings": False,
    "bos_token_id": 100000, "eos_token_id": 100001, "torch_dtype": "bfloat16",
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
}


def shapes() -> dict[str, tuple[int, ...]]:
    """HF parameter names and shapes, experts per expert as released."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**{k: v for k, v in V2_LITE.items() if k != "architectures"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    out = {}
    for name, p in model.state_dict().items():
        m = re.match(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$", name)
        if m and p.dim() == 3:  # transformers 5 stacks experts; the released files hold them one by one
            E = p.shape[0]
            for e in range(E):
                if m.group(2) == "gate_up_proj":
                    inter = p.shape[1] // 2 if p.shape[1] != V2_LITE["hidden_size"] else p.shape[2] // 2
                    out[f"{m.group(1)}.{e}.gate_proj.weight"] = (inter, V2_LITE["hidden_size"])
                    out[f"{m.group(1)}.{e}.up_proj.weight"] = (inter, V2_LITE["hidden_size"])
                else:
                    out[f"{m.group(1)}.{e}.down_proj.weight"] = (V2_LITE["hidden_size"], V2_LITE["moe_intermediate_size"])
        else:
            out[name] = tuple(p.shape)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    if (args.out / "config.json").is_file():
        print(f"{args.out} exists; keeping it", file=sys.stderr)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    groups: dict[str, dict[str, tuple]] = {}
    for name, shape in shapes().items():
        m = re.match(r"model\.layers\.(\d+)\.", name)
        groups.setdefault(f"layer{int(m.group(1)):02d}" if m else "other", {})[name] = shape
    index, total = {}, 0
    for n, (group, tensors) in enumerate(sorted(groups.items())):
        shard = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        data = {}
        for name, shape in tensors.items():
            t = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape) * 0.02
            data[name] = t.to(torch.bfloat16)
            index[name] = shard
            total += t.numel()
        save_file(data, str(args.out / shard), metadata={"format": "pt"})
        print(f"{shard}: {len(tensors)} tensors", file=sys.stderr, flush=True)
        del data
    (args.out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total * 2},
                                                                       "weight_map": index}))
    (args.out / "config.json").write_text(json.dumps(V2_LITE, indent=1))
    print(f"wrote {args.out}: {total / 1e9:.2f}B parameters, {total * 2 / 1e9:.1f} GB bf16")


if __name__ == "__main__":
    main()
