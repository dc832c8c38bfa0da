"""Train a small DeepSeek-V3-style model whose routed experts matter, to judge expert pruning /
merging / distillation on (issue 16): the embedded model's experts are barely specialized
(removing the least-used quarter costs it +0.5% perplexity in-domain; zeroing every routed
expert only +25%).

    OMP_NUM_THREADS=1 python training/train_specialized.py --out /work/specialized/model \
        --steps 3200 --minutes 80 --save-every 500
    OMP_NUM_THREADS=1 python training/specialization_report.py /work/specialized/model

Same architecture family as the embedded model (training/train.py, whose pieces this imports):
MLA, a dense first layer, then MoE layers with 1 shared + 16 routed experts, top-2, noaux_tc
routing (sigmoid, correction bias, 4 groups keep 2), one MTP module; saved in Hugging Face
format by dsexport's save_hf_checkpoint. What differs, and why (600-step trials, in-domain
perplexity cost of pruning the least-used 25% of routed experts by frequency):

- smaller: hidden 128, experts 64 wide, a bf16 file of ~8 MB, ~1.3x the tokens/s per thread;
- the dense first layer is narrow (--dense-intermediate 32; train.py: 3 x hidden). The first
  layer's MLP turns token embeddings into features; when it is wide it does most of the work
  (zeroing it costs x20 perplexity) and the routed experts only refine (zeroing all of them:
  +15%). Narrow, the routed experts of the next layers take that work over, per token cluster:
  pruning cost +3.4% -> +7.6%;
- DeepSeek-V3's complementary sequence-wise balance loss (--seq-aux 0.02, report eq. 17-20) on
  top of the bias updates (--bias-speed 1e-3): the bias alone balances the mixture of corpora,
  so within one corpus a quarter of the experts see few tokens and pruning them is free
  (+1.0%); balanced per sequence, every expert carries its share in both corpora (+3.4%).
  Without any balancing routing collapses onto one expert within 20 steps;
- the MTP loss on a quarter of each batch (--mtp-rows): its output head costs as much as the
  main one, and MTP quality is not this model's point.

Tried and not kept: a sharper router (init std 0.1, no weight decay on it): no change.

Reuses the embedded model's tokenizer and its prepared corpora (training/data.py output in
src/dsexport/assets/deepseek-tiny.work/data), so neither needs rebuilding. One thread by
default; --minutes bounds the wall time (the schedule follows whichever of steps and minutes
runs out first, so a slow machine still ends on a decayed learning rate).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from train import CONFIG as EMBEDDED_CONFIG, encode, expert_loads, init_weights  # noqa: E402

from dsexport.core.config import parameter_counts, parse_config  # noqa: E402
from dsexport.exporter.hf_format import save_hf_checkpoint  # noqa: E402
from dsexport.exporter.mtp import MTPModule  # noqa: E402
from dsexport.exporter.reference import MoE, DeepseekReference, route  # noqa: E402

ROOT = HERE.parent
EMBEDDED = ROOT / "src" / "dsexport" / "assets" / "deepseek-tiny"
CORPORA = ROOT / "src" / "dsexport" / "assets" / "deepseek-tiny.work" / "data"
DOMAINS = ("english", "code")


def model_config(args) -> dict:
    cfg = copy.deepcopy(EMBEDDED_CONFIG)
    heads = args.heads
    cfg.update({
        "hidden_size": args.hidden, "intermediate_size": args.dense_intermediate,
        "moe_intermediate_size": args.moe_intermediate, "num_hidden_layers": args.layers,
        "num_attention_heads": heads, "num_key_value_heads": heads,
        "q_lora_rank": args.q_lora_rank, "kv_lora_rank": args.kv_lora_rank,
        "qk_nope_head_dim": args.head_dim, "qk_rope_head_dim": args.rope_dim, "v_head_dim": args.head_dim,
        "n_routed_experts": 16, "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
        "routed_scaling_factor": args.routed_scale,
    })
    return cfg


class SequenceBalance:
    """DeepSeek-V3's complementary sequence-wise balance loss (report 2.1.2, eq. 17-20), per MoE
    layer and sequence: sum_i f_i P_i with f_i = E / (K T) x tokens of the sequence routed to
    expert i and P_i = the mean over the sequence of expert i's normalized sigmoid score.
    Recorded by forward hooks (the reference MoE is not changed); 1.0 when perfectly balanced."""

    def __init__(self, model: torch.nn.Module, batch: int):
        self.batch, self.terms = batch, []
        self.moes = [m for m in model.modules() if isinstance(m, MoE)]
        for m in self.moes:
            m.register_forward_hook(self.hook)

    def hook(self, module, inputs, output) -> None:
        if not module.training:
            return
        x = inputs[0]
        logits = x.reshape(-1, x.shape[-1]) @ module.router.T  # [N, E]
        with torch.no_grad():
            _, idx = route(logits.detach(), module.bias, module.cfg, module.groups)
        E, K = logits.shape[1], idx.shape[1]
        B = x.shape[0] if x.dim() == 3 else self.batch
        scores = logits.float().sigmoid()
        scores = (scores / scores.sum(-1, keepdim=True)).view(B, -1, E)  # [B, T, E]
        chosen = torch.zeros_like(scores).view(-1, E).scatter_(1, idx, 1.0).view(B, -1, E)
        f = chosen.mean(1) * E / K  # [B, E]
        self.terms.append((f * scores.mean(1)).sum(-1).mean())

    def take(self) -> torch.Tensor:
        loss = torch.stack(self.terms).mean() if self.terms else torch.zeros(())
        self.terms = []
        return loss


def token_streams(tok, cache: Path) -> dict[str, np.ndarray]:
    """Training token ids per domain (the embedded model's tokenizer), cached as .npy."""
    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in DOMAINS:
        path = cache / f"{name}.train.npy"
        if not path.is_file():
            np.save(path, encode(tok, CORPORA / f"{name}.train.txt"))
        out[name] = np.load(path)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--minutes", type=float, default=None,
                    help="time budget: the schedule runs on max(step / steps, elapsed / minutes), and training "
                         "stops when either reaches 1 (so a busy machine still ends with a decayed learning rate)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--mtp-weight", type=float, default=0.3)
    ap.add_argument("--bias-speed", type=float, default=1e-3, help="noaux_tc bias update speed (gamma); 0: none")
    ap.add_argument("--bias-until", type=float, default=1.0,
                    help="update the bias only during this fraction of training (DeepSeek-V3 stops it at the end)")
    ap.add_argument("--seq-aux", type=float, default=0.02,
                    help="weight alpha of the sequence-wise balance loss (DeepSeek-V3: 1e-4); 0: none")
    ap.add_argument("--router-init-std", type=float, default=None,
                    help="init std of the router rows (default: as every weight, 0.02); larger: sharper routing from the start")
    ap.add_argument("--router-lr-mult", type=float, default=1.0, help="router learning rate / --lr")
    ap.add_argument("--router-wd", type=float, default=0.1, help="router weight decay (others: 0.1)")
    ap.add_argument("--mtp-rows", type=int, default=None,
                    help="rows of each batch the MTP loss is computed on (default batch / 4: MTP quality "
                         "is not this model's point, and its head costs as much as the main one)")
    ap.add_argument("--domain-batches", action=argparse.BooleanOptionalAction, default=False,
                    help="each batch from one corpus (else rows mixed)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dense-intermediate", type=int, default=32)
    ap.add_argument("--moe-intermediate", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--rope-dim", type=int, default=16)
    ap.add_argument("--q-lora-rank", type=int, default=64)
    ap.add_argument("--kv-lora-rank", type=int, default=48)
    ap.add_argument("--routed-scale", type=float, default=2.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--save-every", type=int, default=0, help="also save the checkpoint every N steps")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(EMBEDDED / "tokenizer.json"))
    streams = token_streams(tok, args.out.parent / "tokens")
    sizes = {k: len(v) for k, v in streams.items()}
    total = sum(sizes.values())
    print(f"train tokens: {sizes}", flush=True)

    raw = model_config(args)
    cfg = parse_config(raw)
    model = DeepseekReference(cfg)
    model.mtp = MTPModule(cfg)
    init_weights(model, 0.02)
    if args.router_init_std is not None:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, MoE):
                    m.router.normal_(0.0, args.router_init_std)
    n_params, n_active = parameter_counts(cfg)
    n_mtp = sum(p.numel() for p in model.mtp.parameters())
    print(f"parameters {n_params / 1e6:.2f}M (+{n_mtp / 1e6:.2f}M MTP), {n_active / 1e6:.2f}M read per token", flush=True)
    balance = SequenceBalance(model, args.batch) if args.seq_aux else None
    mtp_rows = args.mtp_rows or max(1, args.batch // 4)
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if not n.endswith("mlp.bias")]  # the bias is not learned
    params = [p for _, p in named]
    routers = [p for n, p in named if n.endswith("mlp.router")]
    others = [p for n, p in named if not n.endswith("mlp.router")]
    opt = torch.optim.AdamW([{"params": others, "lr_mult": 1.0, "weight_decay": 0.1},
                             {"params": routers, "lr_mult": args.router_lr_mult, "weight_decay": args.router_wd}],
                            lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 30)
    t0 = time.perf_counter()

    def progress(s: int) -> float:
        p = s / args.steps
        if args.minutes is not None:
            p = max(p, (time.perf_counter() - t0) / (60 * args.minutes))
        return min(1.0, p)

    def schedule(s: int) -> float:  # linear warm-up, then cosine to 10%
        return min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress(s))))

    history = []
    ema = None

    def save(step_done: int, minutes: float, final: bool) -> None:
        model.eval()
        save_hf_checkpoint(model, model.mtp, raw, args.out, dtype=torch.bfloat16)
        model.train()
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(EMBEDDED / name, args.out / name)
        for name in DOMAINS:
            shutil.copyfile(CORPORA / f"{name}.test.txt", args.out / f"test.{name}.txt")
        (args.out / "TRAINING.json").write_text(json.dumps({
            "script": "training/train_specialized.py", "argv": sys.argv[1:], "complete": final,
            "seed": args.seed, "steps": args.steps, "steps_done": step_done, "batch": args.batch,
            "seq_len": args.seq_len, "lr": args.lr, "mtp_weight": args.mtp_weight, "mtp_rows": mtp_rows,
            "bias_speed": args.bias_speed, "bias_until": args.bias_until, "seq_aux": args.seq_aux,
            "router_init_std": args.router_init_std, "router_lr_mult": args.router_lr_mult, "router_wd": args.router_wd,
            "config": raw,
            "domain_batches": args.domain_batches, "threads": args.threads,
            "tokenizer": "src/dsexport/assets/deepseek-tiny/tokenizer.json",
            "corpora": "src/dsexport/assets/deepseek-tiny.work/data (training/data.py)",
            "train_tokens_per_corpus": sizes, "tokens_seen": step_done * args.batch * args.seq_len,
            "parameters": n_params, "mtp_parameters": n_mtp, "active_parameters_per_token": n_active,
            "minutes_budget": args.minutes, "minutes": minutes, "final_loss": history[-1]["loss"] if history else None,
            "final_mtp_loss": history[-1]["mtp"] if history else None,
            "final_loss_ema": ema, "loss_history": history,
        }, indent=1) + "\n")

    step = 0
    for step in range(args.steps):
        if args.domain_batches:
            names = ["english" if rng.random() < sizes["english"] / total else "code"] * args.batch
        else:
            names = ["english" if rng.random() < sizes["english"] / total else "code" for _ in range(args.batch)]
        rows = []
        for name in names:
            start = rng.integers(0, sizes[name] - args.seq_len - 2)
            rows.append(streams[name][start:start + args.seq_len + 1])
        batch = torch.from_numpy(np.stack(rows).astype(np.int64))
        x, y = batch[:, :-1], batch[:, 1:]
        logits, hidden = model(x, return_hidden=True)
        loss_main = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), y.reshape(-1))
        # MTP: from h_t and token t+1, predict token t+2
        aux = balance.take() if balance else None  # the main model's MoE layers only
        mtp_logits = model.mtp.predict(model, hidden[:mtp_rows, :-1], x[:mtp_rows, 1:])
        loss_mtp = F.cross_entropy(mtp_logits.reshape(-1, cfg.vocab_size), y[:mtp_rows, 1:].reshape(-1))
        if balance:
            balance.terms = []  # the MTP block's term is left out
        loss = loss_main + args.mtp_weight * loss_mtp + (args.seq_aux * aux if aux is not None else 0.0)
        lr_now = args.lr * schedule(step)
        for group in opt.param_groups:
            group["lr"] = lr_now * group["lr_mult"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if args.bias_speed and progress(step) < args.bias_until:
            with torch.no_grad():  # auxiliary-loss-free balancing, as train.py, at --bias-speed
                for moe, load in expert_loads(model):
                    moe.bias += args.bias_speed * torch.sign(load.mean() - load)
        ema = loss_main.item() if ema is None else 0.98 * ema + 0.02 * loss_main.item()
        elapsed = time.perf_counter() - t0
        done = progress(step + 1) >= 1.0
        if step % 50 == 0 or step == args.steps - 1 or done:
            tokens = (step + 1) * args.batch * args.seq_len
            loads = [(load / load.mean()).max().item() for _, load in expert_loads(model)]
            history.append({"step": step, "loss": round(loss_main.item(), 4), "mtp": round(loss_mtp.item(), 4),
                            "ema": round(ema, 4), "minutes": round(elapsed / 60, 2),
                            "seq_balance": round(aux.item(), 4) if aux is not None else None,
                            "load_max_over_mean": [round(v, 2) for v in loads]})
            print(f"step {step} {names[0] if args.domain_batches else 'mixed'} loss {loss_main.item():.3f} "
                  f"ema {ema:.3f} mtp {loss_mtp.item():.3f} "
                  + (f"bal {aux.item():.3f} " if aux is not None else "") + f"lr {lr_now:.2e} "
                  f"load max/mean {' '.join(f'{v:.1f}' for v in loads)} "
                  f"{tokens / elapsed:.0f} tok/s {elapsed / 60:.1f} min", flush=True)
        if args.save_every and step and step % args.save_every == 0:
            save(step + 1, elapsed / 60, False)
        if done:
            if step < args.steps - 1:
                print(f"stopping at step {step}: {args.minutes} minutes", flush=True)
            break
    save(step + 1, (time.perf_counter() - t0) / 60, True)
    print(f"saved {args.out}: {(args.out / 'model.safetensors').stat().st_size / 1e6:.2f} MB", flush=True)


if __name__ == "__main__":
    main()
