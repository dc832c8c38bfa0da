"""Distillation: recover what pruning and quantization cost (`dsexport distill`, docs/distill.md).

Student: the compressed model, i.e. the reference model built from the reader view it is given
(`reader.with_config(cfg.with_kept_experts(kept))` for pruned experts, `.with_merges(...)` for
merged ones: whatever the view's `experts(layer)` returns is where the student starts), with
quantization of the routed experts simulated in the forward pass when a QuantSpec is given (QAT,
straight-through estimator, the exporter's own rounding). Teacher: the original model, every
expert, fp32, never trained.

Loss: forward KL(teacher || student) of the next-token distributions at every real position,
both softened by the temperature T and multiplied by T^2 (Hinton et al. 2015: keeps gradient
magnitudes comparable across T; T = 1 is the plain KL); optionally plus `hidden_weight` x the
MoE layers' output mismatch ||h_s - h_t||^2 / ||h_t||^2 per token. The teacher runs online
(a second model in memory, eval, no grad) or once up front into a cache of its top-k
log-probabilities plus the log of the remaining mass per position: the KL is then taken over
k + 1 outcomes (the top-k tokens and "any other"), which keeps the targets a distribution that
sums to 1. Caching only renormalized top-k logits would push the student to put all its mass on
those k tokens; this way the tail keeps the teacher's mass and the student's own shape within it.

Training: AdamW on the parameters `train` names, linear warm-up then cosine to 10%, a held-out
share of the windows evaluated every `eval_every` steps; the best held-out state is kept and
training stops after `patience` evaluations without improvement (not before 2 epochs). Top-k
routing passes no gradient (the router learns through the routing weights of the experts it
picked); the noaux_tc correction bias is not a gradient parameter: frozen, or moved toward
balanced load after every step as DeepSeek-V3 trains it (`bias_speed`). Embedding, output head
and the MTP module (which shares both) are never trained.

Data parallel: under torch.distributed (torchrun), each rank takes every world-th window of each
global batch and gradients are averaged by DistributedDataParallel; the loss is normalized by the
global batch's token count, so the result equals a single-process run up to float summation
order. Everything is deterministic given the seed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import resource
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from dsexport.core.errors import UserError
from dsexport.core.quant import QuantSpec
from dsexport.exporter.checkpoint import CheckpointReader
from dsexport.exporter.quantize import fake_quantize
from dsexport.exporter.reference import DeepseekReference, RMSNorm, quantize_inputs, set_activation_quant

from .distill_teacher import CachedTargets, Ranks, Teacher, cache_targets, kl_cached_sum, kl_sum, nll_sum, pad

TRAIN_MODES = ("router", "norms", "moe", "all")
TEACHER_MODES = ("online", "cached")
# Few, small parameters (router, norms) take a larger step than whole experts.
# router/norms: 1e-3 moved the held-out KL up in the first evaluations on the specialized model
# (AdamW moves every router coordinate by ~lr per step, and a router row is small); 3e-4 closed
# 8-21% of the gap there where 1e-3 and 1e-4 closed none.
DEFAULT_LR = {"router": 3e-4, "norms": 3e-4, "moe": 5e-4, "all": 5e-4}
Progress = Callable[[str, int, int, str], None]  # (stage, done, total, note)


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    train: str = "moe"  # router | norms | moe | all (see trainable_names)
    steps: int | None = None  # optimizer steps; None: `epochs` passes over the training windows
    epochs: float = 8.0
    batch: int = 16  # windows per optimizer step, over all ranks
    micro_batch: int = 8  # windows per forward on one rank (gradients accumulate)
    lr: float | None = None  # peak learning rate; None: DEFAULT_LR of the mode
    weight_decay: float = 0.0  # toward zero, not toward the teacher's weights: off by default
    warmup: float = 0.05  # share of the steps
    temperature: float = 1.0
    holdout: float = 0.1  # share of the windows held out for early stopping
    eval_every: int | None = None  # steps between held-out evaluations; None: twice per epoch
    patience: int = 3  # evaluations without improvement before stopping
    teacher: str = "cached"  # online | cached
    top_k: int = 64  # cached teacher: log-probs kept per position (plus the rest mass)
    hidden_weight: float = 0.0  # MoE-layer output matching (online teacher only)
    bias_speed: float = 0.0  # noaux_tc bias balancing per step (0: frozen)
    seed: int = 0
    quant: QuantSpec | None = None  # QAT: the spec the bundle will be built with
    device: str = "cpu"

    def __post_init__(self):
        def bad(flag, value, want):
            raise UserError(f"{flag} must be {want}, got {value!r}")

        if self.train not in TRAIN_MODES:
            bad("--train", self.train, "one of " + ", ".join(TRAIN_MODES))
        if self.teacher not in TEACHER_MODES:
            bad("--teacher", self.teacher, "one of " + ", ".join(TEACHER_MODES))
        if self.steps is not None and self.steps < 1:
            bad("--steps", self.steps, "at least 1")
        if not self.epochs > 0:
            bad("--epochs", self.epochs, "positive")
        if self.batch < 1 or self.micro_batch < 1:
            bad("--batch and --micro-batch", (self.batch, self.micro_batch), "at least 1")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            bad("--lr", self.lr, "a positive number")
        if self.patience < 1 or (self.eval_every is not None and self.eval_every < 1):
            bad("--patience and --eval-every", (self.patience, self.eval_every), "at least 1")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            bad("--temperature", self.temperature, "a positive number")
        if not 0 < self.holdout < 1:
            bad("--holdout", self.holdout, "a fraction between 0 and 1")
        if self.top_k < 1:
            bad("--top-k", self.top_k, "at least 1")
        if self.hidden_weight < 0 or self.bias_speed < 0:
            bad("--hidden-weight and --bias-update", (self.hidden_weight, self.bias_speed), "non-negative")
        if self.hidden_weight > 0 and self.teacher != "online":
            raise UserError("--hidden-weight needs --teacher online (the cache holds output distributions only)")

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.train]

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["lr"] = self.peak_lr
        out["quant"] = self.quant.to_json() if self.quant is not None else None
        return out


# ---- what trains ----------------------------------------------------------------------------
def trainable_names(model: DeepseekReference, mode: str) -> set[str]:
    """router: MoE gate weights. norms: + every RMSNorm weight. moe: router + routed and shared
    experts + the RMSNorms of MoE layers. all: every weight but embedding and output head.
    The correction bias is never a gradient parameter (top-k passes it no gradient)."""
    cfg = model.cfg
    norms = {f"{m}.weight" for m, mod in model.named_modules() if isinstance(mod, RMSNorm)}
    moe_prefixes = tuple(f"layers.{i}." for i in cfg.moe_layers)
    names = set()
    for name, _ in model.named_parameters():
        if name.endswith("mlp.bias") or name in ("embed_tokens.weight", "lm_head.weight"):
            continue
        is_router = name.endswith("mlp.router")
        is_expert = name.startswith(moe_prefixes) and (".mlp.w_" in name or ".mlp.shared." in name)
        if (is_router or mode == "all" or (mode == "norms" and name in norms)
                or (mode == "moe" and (is_expert or (name in norms and name.startswith(moe_prefixes))))):
            names.add(name)
    return names


class FakeQuantSTE(nn.Module):
    """Parametrization: the weights the quantized bundle computes with (the exporter's own
    fake_quantize) in the forward pass, the identity in the backward pass (straight-through)."""

    def __init__(self, name: str, quant: QuantSpec, layer: int, expert_ids: tuple[int, ...]):
        super().__init__()
        self.name, self.quant, self.layer, self.expert_ids = name, quant, layer, expert_ids

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            q = fake_quantize(self.name, w.detach().cpu(), self.quant, self.layer, self.expert_ids).to(w)
        return w + (q - w).detach()


def build_student(view: CheckpointReader, config: DistillConfig) -> DeepseekReference:
    """The compressed model as the view gives it (kept, merged experts), fp32, with the parameters
    `config.train` names trainable and, for QAT, routed experts fake-quantized in the forward (and
    the absorbed W_UK/W_UV rounded to fp16 values, as the build rounds them)."""
    model = DeepseekReference.from_checkpoint(view).to(config.device)
    trainable = trainable_names(model, config.train)
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    if config.quant is not None and "routed_experts" in config.quant.bits:
        for i in model.cfg.moe_layers:
            moe = model.layers[i].mlp
            for name in ("w_gate", "w_up", "w_down"):
                parametrize.register_parametrization(
                    moe, name, FakeQuantSTE(f"mlp.{name}", config.quant, i, model.cfg.expert_ids(i)))
    if config.quant is not None and config.quant.active and config.quant.absorbed == "fp16":
        for i, layer in enumerate(model.layers):  # the build rounds the absorbed W_UK/W_UV to fp16 values
            parametrize.register_parametrization(layer.self_attn.kv_b_proj, "weight",
                                                 FakeQuantSTE("self_attn.kv_b_proj.weight", config.quant, i, ()))
    return model


def finalize_student(model: DeepseekReference) -> DeepseekReference:
    """The trained weights without the QAT parametrizations (unrounded: the build rounds them)."""
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, name, leave_parametrized=False)
    return model.eval()


def as_built(model: DeepseekReference, quant: QuantSpec | None) -> DeepseekReference:
    """A copy computing what a bundle built from these weights at `quant` computes (weights and
    activations rounded as DeepseekReference.from_checkpoint(reader, quant) rounds them)."""
    if quant is None:
        return model
    built = copy.deepcopy(model)
    cfg = built.cfg
    with torch.no_grad():
        for i, layer in enumerate(built.layers):
            for name, p in layer.named_parameters():
                p.copy_(fake_quantize(name, p.detach().cpu(), quant, i, cfg.expert_ids(i)).to(p))
            set_activation_quant(layer, quant)
        built.lm_head.weight.copy_(fake_quantize("lm_head.weight", built.lm_head.weight.detach().cpu(), quant))
        block = quant.projection_activation_block("lm_head")
        if block:
            quantize_inputs(built.lm_head, block)
    return built.eval()


# ---- data ---------------------------------------------------------------------------------
def split_windows(windows: list[list[int]], holdout: float, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """(training, held-out) windows: a seeded random `holdout` share held out (at least one)."""
    if len(windows) < 2:
        raise UserError(f"distillation needs at least 2 calibration windows (one held out), got {len(windows)}")
    order = np.random.default_rng(seed).permutation(len(windows))
    n_held = min(len(windows) - 1, max(1, round(holdout * len(windows))))
    held = set(order[:n_held].tolist())
    return ([w for i, w in enumerate(windows) if i not in held], [w for i, w in enumerate(windows) if i in held])


def batches(n_train: int, batch: int, steps: int, seed: int) -> list[list[int]]:
    """Window indices of each optimizer step: a new seeded permutation every epoch."""
    out, epoch = [], 0
    while len(out) < steps:
        order = np.random.default_rng([seed, epoch]).permutation(n_train).tolist()
        out += [order[s:s + batch] for s in range(0, n_train - batch + 1, batch)] or [order]
        epoch += 1
    return out[:steps]


# ---- training -------------------------------------------------------------------------------
class LoadCounter:
    """Tokens routed to each expert of each MoE layer (real tokens only), via MoE.route_recorder."""

    def __init__(self, model: DeepseekReference):
        self.moes = {i: model.layers[i].mlp for i in model.cfg.moe_layers}
        self.counts = {i: torch.zeros(m.router.shape[0], dtype=torch.float64) for i, m in self.moes.items()}
        self.mask: torch.Tensor | None = None  # [B*T] real tokens of the current forward
        for i, moe in self.moes.items():
            moe.route_recorder = lambda idx, i=i: self._add(i, idx)

    def _add(self, layer: int, idx: torch.Tensor) -> None:  # idx [N, k]
        idx = idx.cpu()
        if self.mask is not None:
            idx = idx[self.mask.flatten()]
        self.counts[layer] += torch.bincount(idx.flatten(), minlength=len(self.counts[layer])).double()

    def reset(self) -> None:
        for c in self.counts.values():
            c.zero_()

    def close(self) -> None:
        for moe in self.moes.values():
            moe.route_recorder = None

    def imbalance(self) -> dict[int, float]:
        """Per MoE layer, the busiest expert's load over the mean load."""
        return {i: float(c.max() / c.mean().clamp(min=1e-12)) for i, c in self.counts.items()}


@dataclasses.dataclass
class TrainResult:
    steps: int
    best_step: int
    history: list[dict]  # {"step", "held_out_kl", "train_loss"}
    seconds: float
    stopped_early: bool
    tokens: tuple[int, int]  # training tokens run by this rank, by all ranks


class Trainer:
    def __init__(self, student: DeepseekReference, teacher: Teacher, cache: CachedTargets | None,
                 held_cache: CachedTargets | None, config: DistillConfig, ranks: Ranks):
        self.student, self.teacher, self.cache, self.held_cache = student, teacher, cache, held_cache
        self.config, self.ranks = config, ranks
        self.params = [p for p in student.parameters() if p.requires_grad]
        self.module = student
        if ranks.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.module = DistributedDataParallel(
                student, device_ids=None if config.device == "cpu" else [torch.device(config.device)])
        self.hidden_layers = list(student.cfg.moe_layers) if config.hidden_weight > 0 else []
        self.tokens = 0  # training tokens this rank has run

    def _micro(self, windows: list[list[int]], which: list[int], scale: float) -> float:
        """Forward and backward of one micro-batch (window indices `which`); the loss summed over its
        real tokens, its gradient scaled by `scale`."""
        c, cache = self.config, self.cache
        ids, mask = pad(windows, c.device)
        captured: dict[str, list[torch.Tensor]] = {"s": [], "t": []}
        hooks = [self.student.layers[i].register_forward_hook(lambda m, a, out: captured["s"].append(out))
                 for i in self.hidden_layers]
        with parametrize.cached():
            logits = self.module(ids, attention_mask=mask.long())  # [B, T, V]
        for h in hooks:
            h.remove()
        if cache is not None:
            loss = kl_cached_sum(logits, *cache.batch(which, c.device), mask, c.temperature)
        else:
            hooks = [self.teacher.model.layers[i].register_forward_hook(lambda m, a, out: captured["t"].append(out))
                     for i in self.hidden_layers]
            teacher_logits = self.teacher.logits(windows)
            for h in hooks:
                h.remove()
            loss = kl_sum(logits, teacher_logits, mask, c.temperature)
            for hs, ht in zip(captured["s"], captured["t"]):  # [B, T, D] each
                rel = (hs - ht).pow(2).sum(-1) / ht.pow(2).sum(-1).clamp(min=1e-12)
                loss = loss + c.hidden_weight * rel[mask].sum() / len(self.hidden_layers)
        (loss * scale).backward()
        return float(loss.detach())

    def step(self, windows: list[list[int]], batch: list[int], loads: LoadCounter | None) -> float:
        """One optimizer step's gradients over the global batch (this rank's share)."""
        c = self.config
        tokens = sum(len(windows[n]) for n in batch)  # the global batch's tokens: every rank knows them
        mine = self.ranks.shard(batch)
        self.tokens += sum(len(windows[n]) for n in mine)
        chunks = [mine[s:s + c.micro_batch] for s in range(0, len(mine), c.micro_batch)]
        total = 0.0
        for j, chunk in enumerate(chunks):
            sync = self.ranks.world == 1 or j == len(chunks) - 1
            with contextlib.nullcontext() if sync else self.module.no_sync():
                if loads is not None:
                    loads.mask = pad([windows[n] for n in chunk], "cpu")[1]
                # DDP averages gradients over ranks: scale by world so the result is the global mean
                total += self._micro([windows[n] for n in chunk], chunk, self.ranks.world / tokens)
        return self.ranks.sum(torch.tensor([total], dtype=torch.float64)).item() / tokens

    @torch.no_grad()
    def held_out_kl(self, held: list[list[int]]) -> float:
        """Mean per-token KL on the held-out windows (the training loss without hidden terms)."""
        c = self.config
        mine = self.ranks.shard(list(range(len(held))))
        total = torch.zeros(2, dtype=torch.float64)
        for s in range(0, len(mine), c.micro_batch):
            which = mine[s:s + c.micro_batch]
            windows = [held[n] for n in which]
            ids, mask = pad(windows, c.device)
            with parametrize.cached():
                logits = self.student(ids, attention_mask=mask.long())
            if self.held_cache is not None:
                total[0] += float(kl_cached_sum(logits, *self.held_cache.batch(which, c.device), mask, c.temperature))
            else:
                total[0] += float(kl_sum(logits, self.teacher.logits(windows), mask, c.temperature))
            total[1] += float(mask.sum())
        self.ranks.sum(total)
        return float(total[0] / total[1])


def schedule(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine down to 10% of the peak learning rate."""
    return min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / steps))))


def _snapshot(model: DeepseekReference, names: set[str]) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items() if n in names}


def train(trainer: Trainer, train_w: list[list[int]], held_w: list[list[int]], progress: Progress) -> TrainResult:
    c, student = trainer.config, trainer.student
    steps_per_epoch = max(1, len(train_w) // c.batch)
    steps = c.steps or max(1, round(c.epochs * steps_per_epoch))
    eval_every = c.eval_every or max(1, steps_per_epoch // 2)
    plan = batches(len(train_w), c.batch, steps, c.seed)
    opt = torch.optim.AdamW(trainer.params, lr=c.peak_lr, betas=(0.9, 0.95), weight_decay=c.weight_decay)
    warmup = max(1, round(c.warmup * steps))
    # what to keep of the best state: trained weights (QAT: their unrounded originals) and biases
    keep = {n for n, p in student.named_parameters() if p.requires_grad} | \
        ({n for n, _ in student.named_parameters() if n.endswith("mlp.bias")} if c.bias_speed else set())
    loads = LoadCounter(student) if c.bias_speed else None
    start = time.perf_counter()
    best_kl, best_step, best_state = trainer.held_out_kl(held_w), 0, _snapshot(student, keep)
    history, since_best, train_loss, step = [{"step": 0, "held_out_kl": best_kl, "train_loss": None}], 0, [], 0
    progress("distill", 0, steps, f"held-out KL {best_kl:.4f}")
    student.train()
    for step, batch in enumerate(plan, 1):
        for group in opt.param_groups:
            group["lr"] = c.peak_lr * schedule(step - 1, steps, warmup)
        opt.zero_grad(set_to_none=True)
        train_loss.append(trainer.step(train_w, batch, loads))
        torch.nn.utils.clip_grad_norm_(trainer.params, 1.0)
        opt.step()
        if loads is not None:  # auxiliary-loss-free balancing (DeepSeek-V3): raise under-loaded experts
            with torch.no_grad():
                for i, moe in loads.moes.items():
                    load = trainer.ranks.sum(loads.counts[i].clone())
                    moe.bias += c.bias_speed * torch.sign(load.mean() - load).to(moe.bias)
            loads.reset()
        if step % eval_every and step != steps:
            continue
        student.eval()
        kl = trainer.held_out_kl(held_w)
        student.train()
        history.append({"step": step, "held_out_kl": kl, "train_loss": float(np.mean(train_loss))})
        train_loss = []
        if kl < best_kl:
            best_kl, best_step, best_state, since_best = kl, step, _snapshot(student, keep), 0
        else:
            since_best += 1
        progress("distill", step, steps, f"loss {history[-1]['train_loss']:.4f} held-out KL {kl:.4f} (best {best_kl:.4f})")
        if since_best >= c.patience and step >= 2 * steps_per_epoch:  # early evaluations are noisy
            break
    if loads is not None:
        loads.close()
    student.load_state_dict(best_state, strict=False)
    student.eval()
    progress("distill", steps, steps, f"best held-out KL {best_kl:.4f} at step {best_step}")
    tokens = (trainer.tokens, int(trainer.ranks.sum(torch.tensor([trainer.tokens], dtype=torch.float64)).item()))
    return TrainResult(step, best_step, history, time.perf_counter() - start, step < steps, tokens)


# ---- evaluation -------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(models: dict[str, DeepseekReference], teacher: Teacher, windows: list[list[int]], ranks: Ranks,
             device: str, chunk: int = 8) -> dict:
    """Perplexity of the teacher and of each model, their KL from the teacher (T = 1, per token)
    and the busiest expert's load over the mean per MoE layer, on the windows."""
    mine = ranks.shard(windows)
    sums = torch.zeros(2 * len(models) + 3, dtype=torch.float64)  # teacher nll, tokens, next tokens, nll/kl per model
    counters = {name: LoadCounter(m) for name, m in models.items()}
    for part, t_logits in teacher.chunks(mine, chunk):
        ids, mask = pad(part, device)
        sums[0] += float(nll_sum(t_logits, ids, mask))
        sums[1] += float(mask.sum())
        sums[2] += float(mask[:, 1:].sum())
        for j, (name, model) in enumerate(models.items()):
            counters[name].mask = mask.cpu()
            logits = model(ids, attention_mask=mask.long())
            sums[3 + 2 * j] += float(nll_sum(logits, ids, mask))
            sums[4 + 2 * j] += float(kl_sum(logits, t_logits, mask, 1.0))
    ranks.sum(sums)
    for counter in counters.values():
        for c in counter.counts.values():
            ranks.sum(c)
        counter.close()
    out = {"windows": len(windows), "tokens": int(sums[1]), "ppl_teacher": math.exp(sums[0] / sums[2])}
    for j, name in enumerate(models):
        ppl = math.exp(sums[3 + 2 * j] / sums[2])
        out[name] = {"ppl": ppl, "ppl_delta": ppl / out["ppl_teacher"] - 1, "kl": float(sums[4 + 2 * j] / sums[1]),
                     "load_max_over_mean": {str(i): round(v, 3) for i, v in counters[name].imbalance().items()}}
    if "before" in out and "after" in out:
        gap = out["before"]["ppl"] - out["ppl_teacher"]
        out["gap_closed"] = (out["before"]["ppl"] - out["after"]["ppl"]) / gap if gap > 0 else None
    return out


# ---- the stage --------------------------------------------------------------------------------
@dataclasses.dataclass
class DistillResult:
    student: DeepseekReference  # the best held-out state, fp32, QAT parametrizations removed
    config: DistillConfig
    training: TrainResult
    metrics: dict  # {"held_out": evaluate(...), "<eval file>": evaluate(...)}
    windows: dict  # {"train": n, "held_out": n, "tokens": n}
    seconds: float
    phases: dict  # wall seconds of each phase
    cpu_seconds: float  # user + system CPU time of this process (less sensitive than wall time to other load)
    peak_rss_bytes: int

    def report(self) -> dict:
        t = self.training
        return {"settings": self.config.to_json(), "windows": self.windows,
                "steps": t.steps, "best_step": t.best_step, "stopped_early": t.stopped_early,
                "train_seconds": round(t.seconds, 2), "seconds": round(self.seconds, 2),
                "phases": {k: round(v, 2) for k, v in self.phases.items()}, "cpu_seconds": round(self.cpu_seconds, 2),
                "train_tokens": {"rank0": t.tokens[0], "all_ranks": t.tokens[1]},
                "peak_rss_bytes": self.peak_rss_bytes, "history": t.history, "quality": self.metrics}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def distill(teacher_reader: CheckpointReader, student_view: CheckpointReader, windows: list[list[int]],
            config: DistillConfig, evals: dict[str, list[list[int]]] | None = None,
            progress: Progress = lambda stage, done, total, note="": None, ranks: Ranks | None = None) -> DistillResult:
    """Distill the teacher (all experts) into the student the view describes, on token windows.
    evals: further named window sets to report quality on (e.g. another domain's text)."""
    start, cpu_start = time.perf_counter(), cpu_seconds()
    ranks = ranks or Ranks.current()
    torch.manual_seed(config.seed)
    vocab = teacher_reader.config.vocab_size
    if any(t >= vocab or t < 0 for w in windows for t in w):
        raise UserError(f"the calibration tokens fall outside the model's vocabulary ({vocab})")
    train_w, held_w = split_windows(windows, config.holdout, config.seed)
    if len(train_w) < config.batch:
        config = dataclasses.replace(config, batch=len(train_w))
    if config.batch < ranks.world:
        raise UserError(f"--batch {config.batch} is smaller than the {ranks.world} ranks: each needs a window per step")
    teacher = Teacher(teacher_reader, config.teacher == "online", config.device)
    cache = held_cache = None
    if config.teacher == "cached":
        progress("teacher", 0, 1, "")
        cache = cache_targets(teacher_reader, train_w, config.temperature, config.top_k, ranks)
        held_cache = cache_targets(teacher_reader, held_w, config.temperature, config.top_k, ranks)
        progress("teacher", 1, 1, f"top-{config.top_k} targets of {len(windows)} windows cached")
    phases = {"teacher": time.perf_counter() - start}
    student = build_student(student_view, config)
    result = train(Trainer(student, teacher, cache, held_cache, config, ranks), train_w, held_w, progress)
    del cache, held_cache
    student = finalize_student(student)
    phases["train"] = time.perf_counter() - start - phases["teacher"]
    progress("evaluate", 0, 1 + len(evals or {}), "")
    models = {"before": DeepseekReference.from_checkpoint(student_view, config.quant).to(config.device),
              "after": as_built(student, config.quant)}
    metrics = {"held_out": evaluate(models, teacher, held_w, ranks, config.device)}
    for n, (name, ws) in enumerate((evals or {}).items(), 1):
        metrics[name] = evaluate(models, teacher, ws, ranks, config.device)
        progress("evaluate", n, 1 + len(evals), name)
    progress("evaluate", 1 + len(evals or {}), 1 + len(evals or {}), "")
    phases["evaluate"] = time.perf_counter() - start - phases["teacher"] - phases["train"]
    info = {"train": len(train_w), "held_out": len(held_w), "tokens": sum(map(len, windows))}
    peak = ranks.sum(torch.tensor([peak_rss_bytes()], dtype=torch.float64)).item() if ranks.world > 1 else peak_rss_bytes()
    return DistillResult(student, config, result, metrics, info, time.perf_counter() - start, phases,
                         cpu_seconds() - cpu_start, int(peak))
