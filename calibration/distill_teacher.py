"""The teacher side of distillation (calibration/distill.py): the losses, the teacher's logits
online or streamed, the cached top-k targets, and the ranks of a data-parallel run.

Cached targets: per position the teacher's top-k log-probabilities at temperature T and the log of
the mass outside them. The KL is then taken over k + 1 outcomes (the top-k tokens and "any
other"): the targets stay a distribution that sums to 1, and within the tail the student keeps
its own shape. Renormalizing the top-k alone would tell the student the tail has no mass.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from dsexport.exporter.checkpoint import CheckpointReader
from dsexport.exporter.reference import DeepseekReference, streamed_hidden


# ---- ranks (torch.distributed or a single process) ---------------------------------------------
@dataclasses.dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    comm_device: str = "cpu"  # where collectives run: cpu (gloo) or the rank's GPU (NCCL)

    @classmethod
    def current(cls) -> "Ranks":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            nccl = dist.get_backend() == "nccl"
            return cls(dist.get_rank(), dist.get_world_size(), f"cuda:{torch.cuda.current_device()}" if nccl else "cpu")
        return cls()

    def shard(self, items: list) -> list:
        return items[self.rank::self.world]

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over ranks (in place)."""
        if self.world > 1:
            import torch.distributed as dist

            on = t.to(self.comm_device)
            dist.all_reduce(on)
            t.copy_(on)
        return t


# ---- data ---------------------------------------------------------------------------------
def pad(windows: list[list[int]], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] and the mask of real tokens [B, T]."""
    T = max(len(w) for w in windows)
    ids = torch.zeros(len(windows), T, dtype=torch.long)
    mask = torch.zeros(len(windows), T, dtype=torch.bool)
    for b, w in enumerate(windows):
        ids[b, :len(w)] = torch.tensor(w)
        mask[b, :len(w)] = True
    return ids.to(device), mask.to(device)


# ---- losses -------------------------------------------------------------------------------
def kl_sum(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, T: float) -> torch.Tensor:
    """T^2 x sum over real positions of KL(softmax(teacher/T) || softmax(student/T)); logits [B, S, V]."""
    logp_t = F.log_softmax(teacher.float() / T, -1)
    logp_s = F.log_softmax(student.float() / T, -1)
    kl = (logp_t.exp() * (logp_t - logp_s)).sum(-1)  # [B, S]
    return kl[mask].sum() * T * T


def kl_cached_sum(student: torch.Tensor, idx: torch.Tensor, logp_top: torch.Tensor, logp_rest: torch.Tensor,
                  mask: torch.Tensor, T: float) -> torch.Tensor:
    """The KL over the teacher's top-k tokens and one "other" outcome. student [B, S, V]; idx,
    logp_top [B, S, k]; logp_rest [B, S] (the teacher's log mass outside its top-k)."""
    z = student.float() / T
    norm = z.logsumexp(-1)  # [B, S]
    logq_top = z.gather(-1, idx) - norm[..., None]  # [B, S, k]
    logq_rest = z.scatter(-1, idx, float("-inf")).logsumexp(-1) - norm  # [B, S]
    kl = (logp_top.exp() * (logp_top - logq_top)).sum(-1)
    rest = logp_rest.exp() * (logp_rest - logq_rest)
    kl = kl + torch.where(logp_rest.isinf(), torch.zeros_like(rest), rest)  # no mass left: 0 log 0 = 0
    return kl[mask].sum() * T * T


def nll_sum(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed next-token negative log-likelihood over positions whose next token is real."""
    logp = F.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None])[..., 0]  # [B, S-1]
    return -logp[mask[:, 1:]].sum()


# ---- the teacher ----------------------------------------------------------------------------
@dataclasses.dataclass
class CachedTargets:
    """Per window: the teacher's top-k token ids, their log-probs at T, and the log rest mass."""
    idx: list[torch.Tensor]  # [T, k] int32
    logp_top: list[torch.Tensor]  # [T, k]
    logp_rest: list[torch.Tensor]  # [T]

    def batch(self, which: list[int], device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        T = max(self.idx[n].shape[0] for n in which)

        def stack(parts, fill):
            out = torch.full((len(which), T, *parts[which[0]].shape[1:]), fill, dtype=parts[which[0]].dtype)
            for b, n in enumerate(which):
                out[b, :parts[n].shape[0]] = parts[n]
            return out.to(device)

        return stack(self.idx, 0).long(), stack(self.logp_top, 0.0), stack(self.logp_rest, 0.0)


@torch.no_grad()
def cache_targets(reader: CheckpointReader, windows: list[list[int]], T: float, k: int, ranks: Ranks,
                  chunk: int = 1024) -> CachedTargets:
    """The cached teacher over all windows; each rank computes its share, the sum over ranks fills
    the rest (the zeros of the other ranks' windows add nothing)."""
    head = reader.lm_head()  # [V, D]
    k = min(k, head.shape[0] - 1)
    S = max(len(w) for w in windows)
    idx = torch.zeros(len(windows), S, k, dtype=torch.int32)  # 4 bytes per id: vocabularies stay below 2^31
    top = torch.zeros(len(windows), S, k)
    rest = torch.zeros(len(windows), S)
    mine = ranks.shard(list(range(len(windows))))
    for c in range(0, len(mine), chunk):  # bounded hidden states: `chunk` windows per pass over the layers
        part = mine[c:c + chunk]
        for n, h in zip(part, streamed_hidden(reader, [windows[n] for n in part])):
            logp = F.log_softmax((h @ head.T) / T, -1)  # [T, V]
            values, ids = logp.topk(k, dim=-1)  # [T, k]
            L = len(windows[n])
            idx[n, :L], top[n, :L] = ids.int(), values
            rest[n, :L] = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    for t in (idx, top, rest):
        ranks.sum(t)
    lengths = [len(w) for w in windows]
    return CachedTargets([idx[n, :L] for n, L in enumerate(lengths)], [top[n, :L] for n, L in enumerate(lengths)],
                         [rest[n, :L] for n, L in enumerate(lengths)])


class Teacher:
    """Teacher logits: the model in memory (online), or, when there is none, its final hidden
    states streamed layer by layer and the head applied (bounded memory, for evaluation)."""

    def __init__(self, reader: CheckpointReader, online: bool, device: str):
        self.reader, self.device = reader, device
        self.model = DeepseekReference.from_checkpoint(reader).to(device) if online else None

    @torch.no_grad()
    def logits(self, windows: list[list[int]]) -> torch.Tensor:  # [B, T, V]
        ids, mask = pad(windows, self.device)
        return self.model(ids, attention_mask=mask.long())

    @torch.no_grad()
    def chunks(self, windows: list[list[int]], chunk: int):
        """(windows, teacher logits [B, T, V]) per chunk of the windows; streamed, the checkpoint is
        read once for all of them."""
        if self.model is not None:
            for s in range(0, len(windows), chunk):
                yield windows[s:s + chunk], self.logits(windows[s:s + chunk])
            return
        head = self.reader.lm_head().to(self.device)  # [V, D]
        hidden = streamed_hidden(self.reader, windows)
        for s in range(0, len(windows), chunk):
            part = windows[s:s + chunk]
            out = torch.zeros(len(part), max(map(len, part)), head.shape[0], device=self.device)
            for b, h in enumerate(hidden[s:s + chunk]):
                out[b, :h.shape[0]] = h.to(self.device) @ head.T
            yield part, out
