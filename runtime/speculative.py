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
back to plain decoding for batches.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import onnxruntime as ort

from dsexport.errors import BundleError, ContextLengthError

from .sampling import sample_token, token_distribution
from .tokenizer import StreamDecoder

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
    def load(cls, directory: Path, manifest: dict) -> "MTPGraph":
        graph = manifest["graphs"].get("mtp")
        if graph is None:
            raise BundleError(f"{directory}: the bundle has no MTP graph (built from a checkpoint without MTP "
                              "weights, or with --no-mtp); drafting needs one")
        path = directory / graph["file"]
        for needed in (path, directory / graph["data"]):
            if not needed.is_file():
                raise BundleError(f"{needed}: missing from the bundle")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # One layer on at most 2 tokens: the calling thread alone, and no spinning worker threads
        # competing with the decoder session's, which alternates with this one every step
        # (with the defaults, drafting ran at 0.53x of plain decoding instead of 0.85x, docs/mtp.md).
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            # mtp.onnx also reads the decoder's model.onnx.data (shared embedding and head); ONNX
            # Runtime maps it from the file, whatever the decoder session's weight mode.
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise BundleError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0]})") from None
        model = manifest["model"]
        return cls(session, int(model["kv_lora_rank"]) + int(model["qk_rope_head_dim"]))

    def empty_cache(self, batch: int = 1) -> ort.OrtValue:
        return _value(np.zeros((batch, 0, self.latent_dim), np.float32), np.float32)

    def forward(self, hidden: np.ndarray, next_ids: np.ndarray, position_ids: np.ndarray,
                attention_mask: np.ndarray, cache: ort.OrtValue) -> tuple[np.ndarray, ort.OrtValue]:
        """hidden [B, T, D] of tokens t, next_ids [B, T] = tokens t+1, positions of tokens t ->
        logits [B, T, V] for tokens t+2, and the grown cache."""
        feed = {"hidden_states": _value(hidden, np.float32), "input_ids": _value(next_ids, np.int64),
                "position_ids": _value(position_ids, np.int64), "attention_mask": _value(attention_mask, np.int64),
                "past_latent": cache}
        logits, present = self.session.run_with_ort_values(["logits", "present_latent"], feed)
        return logits.numpy(), present


def decoder_forward(session: ort.InferenceSession, input_ids: np.ndarray, position_ids: np.ndarray,
                    attention_mask: np.ndarray, cache: list) -> tuple[np.ndarray, np.ndarray, list]:
    """The decoder graph with its `hidden_states` output: logits [B, T, V], hidden [B, T, D], cache."""
    feed = {"input_ids": _value(input_ids, np.int64), "position_ids": _value(position_ids, np.int64),
            "attention_mask": _value(attention_mask, np.int64)}
    for i, value in enumerate(cache):
        feed[f"past_latent.{i}"] = value
    names = ["logits", "hidden_states"] + [f"present_latent.{i}" for i in range(len(cache))]
    out = session.run_with_ort_values(names, feed)
    return out[0].numpy(), out[1].numpy(), list(out[2:])


def truncate_cache(cache: list, length: int) -> list:
    """Each layer's cache [B, S, L] cut to its first `length` positions (drops a rejected draft)."""
    return [_value(value.numpy()[:, :length], np.float32) for value in cache]


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


class _RowOutput:
    """One sequence's text and finish reason per token, decided as Engine._run decides them."""

    def __init__(self, engine, gen, prompt_len: int):
        from .engine import TokenEvent, _safe_end, _stop_position

        self._event, self._safe_end, self._stop_position = TokenEvent, _safe_end, _stop_position
        self.engine, self.gen, self.prompt_len = engine, gen, prompt_len
        self.decoder = StreamDecoder(engine.tokenizer) if engine.tokenizer else None
        self.produced, self.emitted, self.done = 0, 0, False

    def push(self, token: int):
        gen = self.gen
        self.produced += 1
        text = ""
        if self.decoder:
            self.decoder.push(token)
            text = self.decoder.text
        cut = self._stop_position(text, gen.stop)
        reason = None
        if token in self.engine.eos_ids and not gen.ignore_eos:
            reason = "eos"
        elif cut is not None:
            reason = "stop"
        elif self.produced >= gen.max_new_tokens:
            reason = "length"
        elif self.prompt_len + self.produced >= self.engine.max_context:
            reason = "context"
        self.done = reason is not None
        if self.done and reason != "stop" and self.decoder:
            text = self.decoder.final_text
        end = cut if cut is not None else len(text) if self.done else self._safe_end(text, gen.stop)
        delta = text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return self._event(0, token, delta, reason)


class SpeculativeDecoder:
    """Draft with the MTP graph, verify with the decoder; one prompt at a time."""

    def __init__(self, engine, mtp: MTPGraph):
        outputs = {o["name"] for o in engine.manifest["graphs"]["decoder"].get("outputs", [])}
        if "hidden_states" not in outputs:
            raise BundleError(f"{engine.directory}: the decoder graph has no hidden_states output for the MTP graph")
        self.engine, self.mtp = engine, mtp
        self.last_stats: DraftStats | None = None

    def _draft(self, logits: np.ndarray, gen, rng, seen: list[int]) -> tuple[int, np.ndarray | None]:
        """The draft token and the distribution q it was drawn from (None: greedy, q one-hot)."""
        history = np.asarray(seen) if gen.sampling.repetition_penalty != 1.0 else None
        if gen.sampling.greedy:
            return sample_token(logits, gen.sampling, rng, history), None
        q = token_distribution(logits, gen.sampling, history)
        return int(rng.choice(q.size, p=q)), q

    def _verify(self, logits: np.ndarray, draft: int, q: np.ndarray | None, gen, rng,
                seen: list[int]) -> tuple[bool, int]:
        history = np.asarray(seen) if gen.sampling.repetition_penalty != 1.0 else None
        if gen.sampling.greedy:  # p and q both one-hot: the rule reduces to equality
            target = sample_token(logits, gen.sampling, rng, history)
            return target == draft, target
        p = token_distribution(logits, gen.sampling, history)
        if q is None:
            q = np.zeros_like(p)
            q[draft] = 1.0
        return accept_or_resample(p, q, draft, rng)

    def _pick(self, logits: np.ndarray, gen, rng, seen: list[int]) -> int:
        history = np.asarray(seen) if gen.sampling.repetition_penalty != 1.0 else None
        return sample_token(logits, gen.sampling, rng, history)

    def run(self, prompt: list[int], gen, timings: dict) -> Iterator:
        engine, mtp = self.engine, self.mtp
        session = engine.session
        n = len(prompt)
        if n >= engine.max_context:
            raise ContextLengthError(f"the prompt has {n} tokens; the context holds {engine.max_context} "
                                     "(raise --max-context up to the model's limit, or shorten the prompt)")
        rng = np.random.default_rng(gen.sampling.seed)
        row = _RowOutput(engine, gen, n)
        stats = self.last_stats = timings["draft_stats"] = DraftStats()
        seen = list(prompt)
        ones = lambda length: np.ones((1, length), np.int64)  # noqa: E731  (batch 1: no padding)

        start = time.perf_counter()
        logits, hidden, cache = decoder_forward(session, np.asarray([prompt]), np.arange(n)[None], ones(n),
                                                engine.empty_cache(1))  # [1, n, V], [1, n, D]
        timings["prefill_s"] = time.perf_counter() - start
        timings["prefill_tokens"] = n
        token = self._pick(logits[0, -1], gen, rng, seen)
        seen.append(token)
        yield row.push(token)
        decode_start = time.perf_counter()
        timings["ttft_s"] = decode_start - start
        length = n  # positions in the decoder's cache; seen[length] is chosen but not yet run
        if not row.done:  # the MTP graph over the prompt: (h_t, x_{t+1}) at positions 0..n-1
            mtp_logits, mtp_cache = mtp.forward(hidden, np.asarray([seen[1:]]), np.arange(n)[None], ones(n),
                                                mtp.empty_cache(1))
            stats.mtp_runs += 1
        while not row.done:
            if gen.max_new_tokens - row.produced == 1:  # one token left: a draft could not be used
                logits, hidden, cache = decoder_forward(session, np.asarray([[seen[-1]]]), np.asarray([[length]]),
                                                        ones(length + 1), cache)
                stats.decoder_runs += 1
                length += 1
                token = self._pick(logits[0, -1], gen, rng, seen)
                seen.append(token)
                yield row.push(token)
                break
            draft, q = self._draft(mtp_logits[0, -1], gen, rng, seen)
            stats.drafted += 1
            logits, hidden, verified = decoder_forward(session, np.asarray([[seen[-1], draft]]),
                                                       np.asarray([[length, length + 1]]), ones(length + 2), cache)
            stats.decoder_runs += 1
            accepted, token = self._verify(logits[0, 0], draft, q, gen, rng, seen)
            stats.accepted += accepted
            seen.append(token)
            yield row.push(token)
            if row.done:
                break
            if accepted:
                cache, length = verified, length + 2
                token = self._pick(logits[0, 1], gen, rng, seen)
                seen.append(token)
                yield row.push(token)
                if row.done:
                    break
                # [1, 2, D] hidden states of x_n, x_{n+1} with their next tokens x_{n+1}, x_{n+2}
                mtp_logits, mtp_cache = mtp.forward(hidden, np.asarray([seen[-2:]]),
                                                    np.asarray([[length - 2, length - 1]]), ones(length), mtp_cache)
            else:
                length += 1
                cache = truncate_cache(verified, length)  # drop the draft's entry
                mtp_logits, mtp_cache = mtp.forward(hidden[:, :1], np.asarray([[token]]), np.asarray([[length - 1]]),
                                                    ones(length), mtp_cache)
            stats.mtp_runs += 1
        timings["decode_s"] = stats.decode_s = time.perf_counter() - decode_start
        timings["decode_steps"] = stats.decode_tokens = row.produced - 1
