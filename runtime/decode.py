"""The decode loop: one for every backend and for speculative decoding.

A generation is a list of rows (one per prompt); each row's `RowState` decides, token by token,
the text it adds and whether it is done (end of sequence, a stop string, max_new_tokens, the
context). A stepper produces tokens: `PlainStepper` one per row per decoder run, the speculative
stepper (runtime/speculative.py) one or two; `decode_loop` hands them to the rows and stops when
every row is done. Batches of prompts of different lengths are left-padded; the attention mask
hides the padding and position ids count only real tokens, so each row decodes as it would alone.

Every step's logits are checked: NaN or Inf stops the generation with an error naming the graph
(the paged backend names the layer), instead of sampling token 0 forever.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Iterator, Protocol

import numpy as np

from dsexport.core.errors import NumericalError

from .sampling import SamplingParams, row_rng, sample_token
from .tokenizer import BundleTokenizer, StreamDecoder


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclasses.dataclass
class TokenEvent:
    row: int  # which prompt of the batch
    token_id: int
    text: str  # the text this token adds (may be "" while a multi-byte character is incomplete)
    finish_reason: str | None = None  # set on the row's last event


def stop_position(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def safe_end(text: str, stops: tuple[str, ...]) -> int:
    """Length of the prefix of text that no continuation can make part of a stop string."""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:n]):
                hold = n
                break
    return len(text) - hold


def check_finite(logits: np.ndarray, where: str) -> None:
    if not np.isfinite(logits).all():
        raise NumericalError(f"{where} produced non-finite logits (NaN/Inf): the bundle's weights are corrupt or a "
                             "computation overflowed")


class RowState:
    """One sequence: its tokens, its random stream, its text and why it stopped."""

    def __init__(self, row: int, prompt: list[int], gen: GenerationConfig, tokenizer: BundleTokenizer | None,
                 eos_ids: set[int], max_context: int, context_base: int | None = None):
        self.row, self.prompt, self.gen = row, list(prompt), gen
        self.seen = list(prompt)  # prompt and generated tokens (the repetition penalty's history)
        self.rng = row_rng(gen.sampling.seed, row)
        self.decoder = StreamDecoder(tokenizer) if tokenizer else None
        self.eos_ids, self.max_context = eos_ids, max_context
        self.context_base = len(prompt) if context_base is None else context_base  # cache positions before decode
        self.produced, self.emitted, self.done, self.finish_reason = 0, 0, False, None

    @property
    def output_ids(self) -> list[int]:
        return self.seen[len(self.prompt):]

    @property
    def remaining(self) -> int:
        """Tokens this row can still produce."""
        return max(0, min(self.gen.max_new_tokens - self.produced, self.max_context - self.context_base - self.produced))

    def history(self, seen: list[int] | None = None) -> np.ndarray | None:
        """The repetition penalty's token history (None when it is off)."""
        if self.gen.sampling.repetition_penalty == 1.0:
            return None
        return np.asarray(self.seen if seen is None else seen)

    def sample(self, logits: np.ndarray) -> int:
        return sample_token(logits, self.gen.sampling, self.rng, self.history())

    def sample_after(self, logits: np.ndarray, seen: list[int]) -> int:
        """A token after `seen` (tokens chosen but not yet pushed: a speculative step's first)."""
        return sample_token(logits, self.gen.sampling, self.rng, self.history(seen))

    def push(self, token: int) -> TokenEvent:
        gen = self.gen
        self.seen.append(token)
        self.produced += 1
        text = ""
        if self.decoder:
            self.decoder.push(token)
            text = self.decoder.text
        cut = stop_position(text, gen.stop)
        reason = None
        if token in self.eos_ids and not gen.ignore_eos:
            reason = "eos"
        elif cut is not None:
            reason = "stop"
        elif self.produced >= gen.max_new_tokens:
            reason = "length"
        elif self.context_base + self.produced >= self.max_context:  # the sequence now fills the context
            reason = "context"
        self.done, self.finish_reason = reason is not None, reason
        if self.done and reason != "stop" and self.decoder:
            text = self.decoder.final_text  # flush a held-back partial character
        # Emit text only once it cannot turn out to be the start of a stop string.
        end = cut if cut is not None else len(text) if self.done else safe_end(text, gen.stop)
        delta = text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return TokenEvent(self.row, token, delta, reason)


class Stepper(Protocol):
    def start(self) -> list[list[int]]:
        """Run the prompts; the first token(s) of each row."""

    def advance(self) -> list[list[int]]:
        """One more decoder run; each row's next token(s) (none for rows that are done)."""


GREEDY_BURST_S = 0.05  # time per C call of greedy decoding: streamed tokens arrive at least this often
GREEDY_BURST_STEPS = 64


class PlainStepper:
    """One token per row per decoder run, batches in lockstep."""

    def __init__(self, backend, rows: list[RowState], pad_id: int, prefill_chunk: int | None = None):
        self.backend, self.rows, self.pad_id, self.prefill_chunk = backend, rows, pad_id, prefill_chunk
        self.where = f"the {getattr(backend, 'name', 'decoder')} decoder"
        # One greedy sequence on a backend that loops in C (the native decoder's `greedy`): several
        # steps per call, in bursts of about GREEDY_BURST_S so that streamed text still flows.
        sampling = rows[0].gen.sampling
        self.greedy = getattr(backend, "greedy", None) if len(rows) == 1 and sampling.greedy and \
            sampling.repetition_penalty == 1.0 else None
        self.burst = 4  # steps of the next call, from the last call's time per step

    def start(self) -> list[list[int]]:
        B, longest = len(self.rows), max(len(r.prompt) for r in self.rows)
        ids = np.full((B, longest), self.pad_id, np.int64)
        self.mask = np.zeros((B, longest), np.int64)
        for b, r in enumerate(self.rows):  # left padding: real tokens end at the same column
            ids[b, longest - len(r.prompt):] = r.prompt
            self.mask[b, longest - len(r.prompt):] = 1
        positions = np.maximum(np.cumsum(self.mask, axis=1) - 1, 0)
        logits, self.cache = prefill(self.backend, ids, positions, self.mask, self.backend.empty_cache(B),
                                     self.prefill_chunk, last_only=True)
        self.next_pos = positions[:, -1] + 1
        return self._sample(logits)

    def _sample(self, logits: np.ndarray) -> list[list[int]]:
        last = logits[:, -1]
        check_finite(last, self.where)
        return [[] if r.done else [r.sample(last[b])] for b, r in enumerate(self.rows)]

    def advance(self) -> list[list[int]]:
        if self.greedy is not None:
            return self._greedy_burst()
        done = np.array([r.done for r in self.rows])
        step = np.array([[self.pad_id if r.done else r.seen[-1]] for r in self.rows], np.int64)
        self.mask = np.concatenate([self.mask, (~done)[:, None].astype(np.int64)], axis=1)
        logits, self.cache = self.backend.forward(step, self.next_pos[:, None], self.mask, self.cache)
        self.next_pos = self.next_pos + 1
        return self._sample(logits)

    def _greedy_burst(self) -> list[list[int]]:
        """The row's next tokens from one C loop: those past a stop string, at most a burst's
        length less one, are computed and dropped (the cache is not reused after the generation)."""
        row = self.rows[0]
        start = time.perf_counter()
        tokens, self.cache = self.greedy(row.seen[-1], int(self.next_pos[0]), self.cache,
                                         max(1, min(row.remaining, self.burst)),
                                         () if row.gen.ignore_eos else row.eos_ids)
        per_step = (time.perf_counter() - start) / len(tokens)
        self.burst = int(min(GREEDY_BURST_STEPS, max(1, GREEDY_BURST_S / max(per_step, 1e-6))))
        self.mask = np.ones((1, self.mask.shape[1] + len(tokens)), np.int64)
        self.next_pos = self.next_pos + len(tokens)
        return [tokens]


def prefill(backend, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray, cache: list,
            chunk: int | None = None, last_only: bool = False) -> tuple[np.ndarray, list]:
    """forward() over a prompt, in chunks of at most `chunk` tokens where the bundle has a limit;
    logits of the last chunk only. last_only: the caller reads logits[:, -1] only, so a backend
    with `forward_last` (the native decoder) computes the head for each row's last token alone."""
    T, P = input_ids.shape[1], attention_mask.shape[1] - input_ids.shape[1]
    step = chunk or T
    forward = getattr(backend, "forward_last", None) if last_only else None
    forward = forward or backend.forward
    for start in range(0, T, step):
        end = min(T, start + step)
        logits, cache = forward(input_ids[:, start:end], position_ids[:, start:end], attention_mask[:, :P + end], cache)
    return logits, cache


def decode_loop(stepper, rows: list[RowState], timings: dict) -> Iterator[TokenEvent]:
    """Drive a stepper until every row is done; timings gets prefill_s, ttft_s, decode_s, decode_steps."""
    start = time.perf_counter()
    proposals = stepper.start()
    timings["prefill_s"] = time.perf_counter() - start
    timings["prefill_tokens"] = sum(len(r.prompt) for r in rows)
    decode_start = None
    while True:
        for row, tokens in zip(rows, proposals):
            for token in tokens:
                if row.done:
                    break
                yield row.push(token)
        if decode_start is None:
            decode_start = time.perf_counter()
            timings["ttft_s"] = decode_start - start
        if all(r.done for r in rows):
            break
        proposals = stepper.advance()
    timings["decode_s"] = time.perf_counter() - decode_start
    timings["decode_steps"] = max(r.produced for r in rows) - 1
