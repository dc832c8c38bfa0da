"""Speculative decoding with the bundle's MTP graph (docs/mtp.md). No torch.

One step, for a sequence whose main-model cache holds positions 0..n-1 and whose last token
x_n is chosen but not yet run:

    draft    d ~ q: the MTP graph's prediction for x_{n+1}, from (h_{n-1}, x_n)
    verify   the decoder runs [x_n, d] at positions n, n+1: p_n (for x_{n+1}), p_{n+1}
    accept   greedy: d == argmax p_n; sampled: with probability min(1, p_n(d) / q(d)), else
             x_{n+1} ~ norm(max(p_n - q, 0)) (the standard speculative-sampling rule, so x_{n+1}
             follows p_n exactly). Accepted: x_{n+2} comes from p_{n+1}: two tokens for one
             decoder run. Rejected: the decoder's cache drops d's entry (a slice).
    update   the MTP graph runs on the (hidden state, next token) pairs of the positions the
             decoder just kept: (h_n, x_{n+1}) and, when accepted, (h_{n+1}, x_{n+2}). Its cache
             therefore only ever holds accepted positions and never needs truncating.

Greedy output is the decoder's own greedy output (up to the float differences of running two
tokens at once instead of one, which can flip a near-tie). Batch size 1 only; Engine falls
back to plain decoding for batches. The stepper runs under the one decode loop
(runtime/decode.py), which decides text, stops and finish reasons for it as for plain decoding.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort

from dsexport.core.contract import HIDDEN_STATES, LOGITS, MTP_PAST, MTP_PRESENT
from dsexport.core.errors import BundleError

from .backends import token_feed
from .bundle import Bundle
from .decode import RowState, check_finite
from .sessions import open_session, session_options
from .sampling import token_distribution

DRAFT_MODES = ("mtp",)


@dataclasses.dataclass
class DraftStats:
    """Per generation: how drafting went."""
    drafted: int = 0  # draft tokens proposed (one per verify step)
    accepted: int = 0  # of those, kept
    decoder_runs: int = 0  # decoder graph runs after the prompt
    mtp_runs: int = 0  # MTP graph runs, the prompt's included
    decode_tokens: int = 0  # tokens after the first (the first comes from the prompt's run)
    decode_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def to_json(self) -> dict:
        return {"mode": "mtp", "drafted": self.drafted, "accepted": self.accepted,
                "acceptance_rate": round(self.acceptance_rate, 4), "decoder_runs": self.decoder_runs,
                "mtp_runs": self.mtp_runs, "decode_tokens_per_s": round(self.decode_tokens_per_s, 2)}

    def summary(self) -> str:
        return (f"draft mtp: accepted {self.accepted}/{self.drafted} drafts ({100 * self.acceptance_rate:.1f}%), "
                f"{self.decode_tokens} tokens in {self.decoder_runs} decoder runs, "
                f"decode {self.decode_tokens_per_s:.1f} tokens/s")


def _value(array: np.ndarray, dtype) -> ort.OrtValue:
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array, dtype))


class MTPGraph:
    """ONNX Runtime session over the bundle's mtp.onnx; its one-layer cache is an OrtValue."""

    def __init__(self, session: ort.InferenceSession, latent_dim: int):
        self.session, self.latent_dim = session, latent_dim

    @classmethod
    def load(cls, bundle: Bundle) -> "MTPGraph":
        graph = bundle.manifest.graphs.mtp
        if graph is None:
            raise BundleError(f"{bundle.directory}: the bundle has no MTP graph (built from a checkpoint without MTP "
                              "weights, or with --no-mtp); drafting needs one")
        path = bundle.path(graph.file, "graphs.mtp.file")
        bundle.path(graph.data, "graphs.mtp.data")
        bundle.path(graph.shared_data, "graphs.mtp.shared_data")
        # One layer on at most 2 tokens: the calling thread alone, and no spinning worker threads
        # competing with the decoder session's, which alternates with this one every step
        # (with the defaults, drafting ran at 0.53x of plain decoding instead of 0.85x, docs/mtp.md).
        # mtp.onnx also reads the decoder's model.onnx.data (shared embedding and head); ONNX
        # Runtime maps it from the file, whatever the decoder session's weight mode.
        options = session_options(bundle.manifest, None, spinning=False, single_thread=True)
        session = open_session(path, options, ["CPUExecutionProvider"])
        return cls(session, bundle.manifest.model.latent_dim)

    def empty_cache(self, batch: int = 1) -> ort.OrtValue:
        return _value(np.zeros((batch, 0, self.latent_dim), np.float32), np.float32)

    def forward(self, hidden: np.ndarray, next_ids: np.ndarray, position_ids: np.ndarray,
                attention_mask: np.ndarray, cache: ort.OrtValue) -> tuple[np.ndarray, ort.OrtValue]:
        """hidden [B, T, D] of tokens t, next_ids [B, T] = tokens t+1, positions of tokens t ->
        logits [B, T, V] for tokens t+2, and the grown cache."""
        feed = {name: _value(a, np.int64) for name, a in token_feed(next_ids, position_ids, attention_mask).items()}
        feed.update({HIDDEN_STATES: _value(hidden, np.float32), MTP_PAST: cache})
        logits, present = self.session.run_with_ort_values([LOGITS, MTP_PRESENT], feed)
        return logits.numpy(), present


def accept_or_resample(p: np.ndarray, q: np.ndarray, draft: int, rng: np.random.Generator) -> tuple[bool, int]:
    """The speculative-sampling rule: keep `draft` (drawn from q) with probability
    min(1, p[draft] / q[draft]), else draw from norm(max(p - q, 0)); the token returned then
    follows p exactly. p, q: probabilities [V]; a deterministic draft is q one-hot."""
    if rng.random() * q[draft] < p[draft]:  # u < p/q without dividing by a zero q
        return True, draft
    residual = np.maximum(p - q, 0.0)
    total = residual.sum()
    if total <= 0:  # p == q up to rounding: rejection had probability ~0
        return False, int(rng.choice(p.size, p=p))
    return False, int(rng.choice(p.size, p=residual / total))


class SpeculativeStepper:
    """Draft with the MTP graph, verify with the decoder: one or two tokens per decoder run, one
    sequence (decode_loop drives it like any stepper)."""

    def __init__(self, backend, mtp: MTPGraph, row: RowState, stats: DraftStats, keep_drafting=None):
        """keep_drafting(stats) -> bool, asked after each verify step (draft="auto"'s re-check):
        False decodes the rest of the generation plainly."""
        if not getattr(backend, "has_hidden_states", False):
            raise BundleError("the decoder graph has no hidden_states output for the MTP graph")
        self.backend, self.mtp, self.row, self.stats = backend, mtp, row, stats
        self.keep_drafting, self.drafting = keep_drafting, True
        self.where = "the decoder"

    def _ones(self, length: int) -> np.ndarray:
        return np.ones((1, length), np.int64)  # batch 1: no padding

    def start(self) -> list[list[int]]:
        row, n = self.row, len(self.row.prompt)
        logits, hidden, self.cache = self.backend.forward_hidden(np.asarray([row.prompt]), np.arange(n)[None],
                                                                  self._ones(n), self.backend.empty_cache(1))
        check_finite(logits[0, -1], self.where)
        token = row.sample(logits[0, -1])
        self.length = n  # positions in the decoder's cache; the last chosen token is not yet run
        self.hidden_prompt = hidden
        return [[token]]

    def _run_mtp_on_prompt(self) -> None:
        # the MTP graph over the prompt: (h_t, x_{t+1}) at positions 0..n-1 (x_n: the first generated token)
        n = len(self.row.prompt)
        self.mtp_logits, self.mtp_cache = self.mtp.forward(self.hidden_prompt, np.asarray([self.row.seen[1:n + 1]]),
                                                           np.arange(n)[None], self._ones(n), self.mtp.empty_cache(1))
        self.stats.mtp_runs += 1
        self.hidden_prompt = None

    def advance(self) -> list[list[int]]:
        row, stats = self.row, self.stats
        if self.hidden_prompt is not None:
            self._run_mtp_on_prompt()
        last, length = row.seen[-1], self.length
        if row.remaining == 1 or not self.drafting:  # one token left (a draft could not be used), or stopped
            logits, _, self.cache = self.backend.forward_hidden(np.asarray([[last]]), np.asarray([[length]]),
                                                                self._ones(length + 1), self.cache)
            stats.decoder_runs += 1
            self.length += 1
            check_finite(logits[0, -1], self.where)
            return [[row.sample(logits[0, -1])]]
        draft, q = self._draft()
        stats.drafted += 1
        logits, hidden, verified = self.backend.forward_hidden(np.asarray([[last, draft]]),
                                                               np.asarray([[length, length + 1]]),
                                                               self._ones(length + 2), self.cache)
        stats.decoder_runs += 1
        check_finite(logits[0], self.where)
        accepted, token = self._verify(logits[0, 0], draft, q)
        stats.accepted += accepted
        if self.keep_drafting is not None and not self.keep_drafting(stats):
            self.drafting = False  # the rest plainly: the MTP cache is not needed any more
        if not accepted:
            self.length += 1
            self.cache = self.backend.truncate(verified, self.length)  # drop the draft's entry
            self._update_mtp(hidden[:, :1], [token], [self.length - 1])
            return [[token]]
        self.cache, self.length = verified, length + 2
        history = row.seen + [token]
        second = row.sample_after(logits[0, 1], history)
        self._update_mtp(hidden, [token, second], [length, length + 1])
        return [[token, second]]

    def _update_mtp(self, hidden: np.ndarray, next_tokens: list[int], positions: list[int]) -> None:
        """The MTP graph on the (hidden state, next token) pairs the decoder just kept: its cache
        only ever holds accepted positions."""
        self.mtp_logits, self.mtp_cache = self.mtp.forward(hidden, np.asarray([next_tokens]), np.asarray([positions]),
                                                           self._ones(positions[-1] + 1), self.mtp_cache)
        self.stats.mtp_runs += 1

    def _draft(self) -> tuple[int, np.ndarray | None]:
        """The draft token and the distribution q it was drawn from (None: greedy, q one-hot)."""
        row, logits = self.row, self.mtp_logits[0, -1]
        if row.gen.sampling.greedy:
            return row.sample(logits), None
        q = token_distribution(logits, row.gen.sampling, row.history())
        return int(row.rng.choice(q.size, p=q)), q

    def _verify(self, logits: np.ndarray, draft: int, q: np.ndarray | None) -> tuple[bool, int]:
        row = self.row
        if row.gen.sampling.greedy:  # p and q both one-hot: the rule reduces to equality
            target = row.sample(logits)
            return target == draft, target
        p = token_distribution(logits, row.gen.sampling, row.history())
        if q is None:
            q = np.zeros_like(p)
            q[draft] = 1.0
        return accept_or_resample(p, q, draft, row.rng)
