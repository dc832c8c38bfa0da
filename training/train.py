"""Train the embedded DeepSeek-V3-style model with dsexport's own reference model, on 2 CPU cores.

    apt-get install -y bible-kjv bible-kjv-text      # the English corpus (public domain)
    python training/train.py --out src/dsexport/assets/deepseek-tiny --steps 3000 --seed 0

Architecture: DeepSeek-V3 scaled down: MLA with q-LoRA and YaRN, a dense first layer, then
MoE layers with 1 shared + 16 routed experts, top-2, noaux_tc routing whose correction bias is
updated from the expert load after every step (no auxiliary loss, DeepSeek-V3 report 2.1.2),
and one MTP module trained with the MTP loss (report 2.2, weight lambda). Saved in Hugging Face
format with per-expert keys and the MTP weights under model.layers.{num_hidden_layers}.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import DOC_SEPARATOR, write_corpora  # noqa: E402

from dsexport.core.config import parse_config  # noqa: E402
from dsexport.exporter.hf_format import save_hf_checkpoint  # noqa: E402
from dsexport.exporter.mtp import MTPModule  # noqa: E402
from dsexport.exporter.reference import MoE, DeepseekReference  # noqa: E402

VOCAB = 4096
CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "vocab_size": VOCAB, "hidden_size": 256, "intermediate_size": 768, "moe_intermediate_size": 128,
    "num_hidden_layers": 4, "first_k_dense_replace": 1, "num_attention_heads": 4, "num_key_value_heads": 4,
    "q_lora_rank": 128, "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
    "n_routed_experts": 16, "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
    "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5,
    "num_nextn_predict_layers": 1, "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "max_position_embeddings": 1024, "rope_interleave": True, "tie_word_embeddings": False,
    "attention_bias": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    "torch_dtype": "bfloat16",
}
SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>"]


def train_tokenizer(files: list[Path], out: Path) -> "object":
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(f) for f in files], trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>",
        "pad_token": "<|pad|>", "add_bos_token": False,
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% if not loop.last %}\n\n{% endif %}{% endfor %}",
    }, indent=2) + "\n")
    return tok


def encode(tok, path: Path) -> np.ndarray:
    docs = path.read_text().split(DOC_SEPARATOR)
    ids: list[int] = []
    for doc in docs:
        ids += tok.encode(doc).ids + [2]  # <|eos|> between documents
    return np.asarray(ids, np.int32)


def expert_loads(model) -> list[tuple[MoE, torch.Tensor]]:
    """(MoE layer, tokens each expert received in the last training step) for layers with a bias."""
    return [(m, m.load) for m in model.modules() if isinstance(m, MoE) and m.bias is not None and hasattr(m, "load")]


def init_weights(module: torch.nn.Module, std: float) -> None:
    for name, p in module.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.weight") or "layernorm" in name or name.endswith("_norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias") or name == "bias":
                p.zero_()
            else:
                p.normal_(0.0, std)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--mtp-weight", type=float, default=0.3)
    ap.add_argument("--bias-speed", type=float, default=1e-3, help="noaux_tc bias update speed (gamma)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)

    work = args.out.parent / (args.out.name + ".work")
    corpora = write_corpora(work / "data")
    args.out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer([corpora["english.train"], corpora["code.train"]], args.out)
    streams = {name: encode(tok, corpora[f"{name}.train"]) for name in ("english", "code")}
    sizes = {k: len(v) for k, v in streams.items()}
    print(f"train tokens: {sizes}", flush=True)

    cfg = parse_config(CONFIG)
    model = DeepseekReference(cfg)
    model.mtp = MTPModule(cfg)
    init_weights(model, 0.02)
    model.train()
    params = [p for n, p in model.named_parameters() if not n.endswith("mlp.bias")]  # the bias is not learned
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 30)
    schedule = lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))  # noqa: E731
    total = sum(sizes.values())
    t0 = time.perf_counter()
    for step in range(args.steps):
        rows = []
        for _ in range(args.batch):
            name = "english" if rng.random() < sizes["english"] / total else "code"
            start = rng.integers(0, sizes[name] - args.seq_len - 2)
            rows.append(streams[name][start:start + args.seq_len + 1])
        batch = torch.from_numpy(np.stack(rows).astype(np.int64))
        x, y = batch[:, :-1], batch[:, 1:]
        logits, hidden = model(x, return_hidden=True)
        loss_main = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), y.reshape(-1))
        # MTP: from h_t and token t+1, predict token t+2
        mtp_logits = model.mtp.predict(model, hidden[:, :-1], x[:, 1:])
        loss_mtp = F.cross_entropy(mtp_logits.reshape(-1, cfg.vocab_size), y[:, 1:].reshape(-1))
        loss = loss_main + args.mtp_weight * loss_mtp
        for group in opt.param_groups:
            group["lr"] = args.lr * schedule(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():  # auxiliary-loss-free balancing: raise the bias of under-loaded experts
            for moe, load in expert_loads(model):
                moe.bias += args.bias_speed * torch.sign(load.mean() - load)
        if step % 50 == 0 or step == args.steps - 1:
            elapsed = time.perf_counter() - t0
            tokens = (step + 1) * args.batch * args.seq_len
            print(f"step {step} loss {loss_main.item():.3f} mtp {loss_mtp.item():.3f} "
                  f"lr {args.lr * schedule(step):.2e} {tokens / elapsed:.0f} tok/s {elapsed / 60:.1f} min", flush=True)

    model.eval()
    save_hf_checkpoint(model, model.mtp, CONFIG, args.out, dtype=torch.bfloat16)
    for name in ("english", "code"):
        shutil.copyfile(corpora[f"{name}.test"], args.out / f"test.{name}.txt")
    (args.out / "TRAINING.json").write_text(json.dumps({
        "seed": args.seed, "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr,
        "mtp_weight": args.mtp_weight, "bias_speed": args.bias_speed, "train_tokens_per_corpus": sizes,
        "tokens_seen": args.steps * args.batch * args.seq_len, "minutes": (time.perf_counter() - t0) / 60,
        "final_loss": loss_main.item(), "final_mtp_loss": loss_mtp.item(),
    }, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
