"""Continuous batching: requests join and leave a running decode batch between steps.

    batch = ContinuousBatch(engine, max_rows=4)
    request = batch.add(prompt_ids, GenerationConfig(...), seed_row=0)
    while batch.busy:
        for event in batch.step():      # BatchEvent(request, TokenEvent, logprobs)
            ...
    batch.cancel(request)               # frees its row before the next step

Each `step()` first prefills the requests waiting to join (each on its own, so a long prompt
does not stall in a padded batch), samples their first token, and merges them into the batch;
then it runs one decoder step for every running row. Rows are left-padded in the cache: the
attention mask hides the padding and position ids are explicit, so every row decodes exactly as
it would alone (same greedy tokens; a row's random stream is its own, runtime/sampling.py). A
finished or cancelled row leaves at the next step, and the common left padding is trimmed.

The cache moves through numpy only when the batch's rows change; between such steps the
backend's own cache values (OrtValues, GPU buffers) pass through untouched. A backend that can
batch needs `cache_to_host(cache) -> [array [B, S, L]]` and `cache_from_host(arrays)`.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from dsexport.core.errors import UserError

from .decode import GenerationConfig, RowState, TokenEvent, check_finite, prefill


@dataclasses.dataclass
class Request:
    id: int
    prompt: list[int]
    gen: GenerationConfig
    row: RowState
    top_logprobs: int | None = None  # None: no logprobs; 0: the chosen token's only
    cancelled: bool = False

    @property
    def done(self) -> bool:
        return self.row.done or self.cancelled


@dataclasses.dataclass
class BatchEvent:
    request: Request
    token: TokenEvent
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None  # (token id, logprob) of the most likely tokens


def _logprobs(logits: np.ndarray, token: int, k: int | None) -> tuple[float | None, list | None]:
    if k is None:
        return None, None
    x = logits.astype(np.float64)
    x = x - x.max()
    logp = x - np.log(np.exp(x).sum())
    top = None
    if k:
        ids = np.argpartition(-logp, k - 1)[:k]
        ids = ids[np.argsort(-logp[ids], kind="stable")]
        top = [(int(i), float(logp[i])) for i in ids]
    return float(logp[token]), top


class ContinuousBatch:
    def __init__(self, engine, max_rows: int = 4):
        if max_rows < 1:
            raise UserError("a batch holds at least one row")
        for needed in ("cache_to_host", "cache_from_host"):
            if not hasattr(engine.backend, needed):
                raise UserError(f"the {engine.backend.name} backend cannot batch requests (no {needed})")
        self.engine, self.max_rows = engine, max_rows
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._ids = itertools.count()
        self.cache = None  # the backend's values, [B, S, L] per layer
        self.mask = np.zeros((0, 0), np.int64)
        self.next_pos = np.zeros(0, np.int64)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, prompt: list[int], gen: GenerationConfig, seed_row: int = 0,
            top_logprobs: int | None = None) -> Request:
        """Queue a prompt (token ids); it joins the batch at the next step. seed_row: which stream
        of the seed the row samples from (the choices of one request use 0, 1, ...)."""
        engine = self.engine
        ids = engine.prompt_ids(prompt)
        if len(ids) >= engine.max_context:
            from dsexport.core.errors import ContextLengthError

            raise ContextLengthError(f"the prompt has {len(ids)} tokens; the context holds {engine.max_context}")
        row = RowState(seed_row, ids, gen, engine.tokenizer, engine.eos_ids, engine.max_context)
        request = Request(next(self._ids), ids, gen, row, top_logprobs)
        self.waiting.append(request)
        return request

    def cancel(self, request: Request) -> None:
        request.cancelled = True
        if request in self.waiting:
            self.waiting.remove(request)

    # ---- one step -------------------------------------------------------------------------
    def step(self) -> list[BatchEvent]:
        with self.engine._exclusive():
            events = self._leave()
            events += self._join()
            if self.running:
                events += self._decode()
            return events

    def _leave(self) -> list[BatchEvent]:
        keep = [i for i, r in enumerate(self.running) if not r.done]
        if len(keep) == len(self.running):
            return []
        self.running = [self.running[i] for i in keep]
        if not keep:
            self.cache, self.mask, self.next_pos = None, np.zeros((0, 0), np.int64), np.zeros(0, np.int64)
            return []
        host = [c[keep] for c in self.engine.backend.cache_to_host(self.cache)]
        mask = self.mask[keep]
        first = int(np.argmax(mask.any(axis=0)))  # columns every remaining row pads: dropped
        self.cache = self.engine.backend.cache_from_host([c[:, first:] for c in host])
        self.mask, self.next_pos = mask[:, first:], self.next_pos[keep]
        return []

    def _join(self) -> list[BatchEvent]:
        events, joined = [], []
        while self.waiting and len(self.running) + len(joined) < self.max_rows:
            request = self.waiting.pop(0)
            if request.cancelled:
                continue
            backend, n = self.engine.backend, len(request.prompt)
            logits, cache = prefill(backend, np.asarray([request.prompt]), np.arange(n)[None], np.ones((1, n), np.int64),
                                    backend.empty_cache(1), self.engine.prefill_chunk, last_only=True)
            last = logits[0, -1]
            check_finite(last, f"the {backend.name} decoder")
            token = request.row.sample(last)
            events.append(BatchEvent(request, request.row.push(token), *_logprobs(last, token, request.top_logprobs)))
            if not request.row.done:
                joined.append((request, backend.cache_to_host(cache)))
        if joined:
            self._merge(joined)
        return events

    def _merge(self, joined: list) -> None:
        old = self.engine.backend.cache_to_host(self.cache) if self.running else []
        parts = [(old, self.mask)] if self.running else []
        parts += [(cache, np.ones((1, len(r.prompt)), np.int64)) for r, cache in joined]
        width = max(mask.shape[1] for _, mask in parts)
        layers = len(self.engine.backend.empty_cache(1))
        merged = []
        for layer in range(layers):
            blocks = [np.pad(cache[layer], ((0, 0), (width - cache[layer].shape[1], 0), (0, 0))) for cache, _ in parts]
            merged.append(np.ascontiguousarray(np.concatenate(blocks)))
        self.mask = np.concatenate([np.pad(m, ((0, 0), (width - m.shape[1], 0))) for _, m in parts])
        self.next_pos = np.concatenate([self.next_pos] + [np.array([len(r.prompt)]) for r, _ in joined])
        self.running += [r for r, _ in joined]
        self.cache = self.engine.backend.cache_from_host(merged)

    def _decode(self) -> list[BatchEvent]:
        backend = self.engine.backend
        step = np.array([[r.row.seen[-1]] for r in self.running], np.int64)
        self.mask = np.concatenate([self.mask, np.ones((len(self.running), 1), np.int64)], axis=1)
        logits, self.cache = backend.forward(step, self.next_pos[:, None], self.mask, self.cache)
        self.next_pos = self.next_pos + 1
        check_finite(logits[:, -1], f"the {backend.name} decoder")
        events = []
        for b, request in enumerate(self.running):
            if request.done:
                continue
            last = logits[b, -1]
            token = request.row.sample(last)
            events.append(BatchEvent(request, request.row.push(token), *_logprobs(last, token, request.top_logprobs)))
        return events
