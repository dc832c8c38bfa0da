"""The one worker thread that runs the engine for every HTTP request.

    scheduler = Scheduler(engine, parallel=4, max_queue=16, metrics=server_metrics())
    scheduler.start()
    ticket = scheduler.submit(job, loop)     # APIError 429 when full, 503 when stopped
    item = await ticket.next(timeout)        # ("tokens", [TokenOut]) ..., then ("done", summary) or ("error", APIError)
    scheduler.cancel(ticket)                 # the client went away: its rows leave at the next step

Requests join and leave the running decode batch between steps (runtime/batch.py
ContinuousBatch): each step prefills the requests that got a free row, then decodes one token for
every running row. A request's n choices are n rows sampling from rows 0..n-1 of its seed's
streams. Admission counts rows: at most `parallel` decode at once and `max_queue` more wait; a
request that would exceed that is refused at once (429 with Retry-After) rather than queued
without bound.

With MTP drafting (Engine.load(draft="mtp")) requests run one at a time through Engine.stream,
which drafts for a single sequence.

Every engine call happens on this thread (the engine runs one generation at a time); the event
loop only submits, cancels and reads results, which arrive through `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections import deque

from dsexport.core.errors import UserError
from dsexport.runtime.batch import ContinuousBatch

from .cache_stats import CacheCounters
from .openai_api import FINISH, APIError, Job

log = logging.getLogger("dsexport.serve")
RETRY_AFTER_S = 1


@dataclasses.dataclass
class TokenOut:
    choice: int
    token: int
    text: str
    finish_reason: str | None  # OpenAI's: "stop" | "length", on the choice's last token
    logprob: float | None = None
    top: list | None = None


@dataclasses.dataclass
class Choice:
    index: int
    prompt: list[int]
    seed_row: int
    request: object | None = None  # the batch's Request while it runs
    generated: int = 0
    finish_reason: str | None = None


class Ticket:
    """One HTTP request's generation: its choices, timings and the queue its results arrive on."""

    def __init__(self, job: Job, loop: asyncio.AbstractEventLoop):
        self.job, self.loop = job, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.choices = [Choice(i, ids, row) for i, ids, row in job.choices]
        self.admitted = time.perf_counter()
        self.started = self.first_token = self.finished = None
        self.cancelled = False
        self.outcome: str | None = None  # "ok" | "cancelled" | "error"
        self.generated_after_cancel = 0  # tokens produced after the cancel reached the worker
        self.cache_baseline = None
        self.summary: dict = {}

    @property
    def rows(self) -> int:
        return len(self.choices)

    @property
    def generated(self) -> int:
        return sum(c.generated for c in self.choices)

    def post(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown)
            pass

    async def next(self, timeout: float | None = None):
        """The next item, or None after `timeout` seconds without one."""
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return None


class Scheduler:
    def __init__(self, engine, parallel: int = 4, max_queue: int = 16, metrics=None):
        if parallel < 1 or max_queue < 0:
            raise ValueError("parallel must be at least 1 and max_queue at least 0")
        self.engine, self.parallel, self.max_queue, self.metrics = engine, parallel, max_queue, metrics
        self.draft = engine.drafter is not None
        self.batch = None if self.draft else ContinuousBatch(engine, max_rows=parallel)
        self.cache = CacheCounters(engine.backend)
        self._cond = threading.Condition()
        self._inbox: list[Ticket] = []
        self._cancels: list[Ticket] = []
        self._live: dict[int, tuple[Ticket, Choice]] = {}  # batch request id -> its ticket and choice
        self._tickets: set[Ticket] = set()  # admitted, not finished
        self._rows = 0  # rows of admitted, unfinished tickets
        self._closing = False
        self.steps = 0
        self.running_rows = 0
        self.recent: deque = deque(maxlen=256)  # finished tickets, newest last (tests, debugging)
        self.thread = threading.Thread(target=self._work, name="dsexport-serve", daemon=True)
        self.failed: BaseException | None = None  # the worker itself died (a bug)

    @property
    def capacity(self) -> int:
        return (1 if self.draft else self.parallel) + self.max_queue

    @property
    def queued(self) -> int:
        """Admitted requests that have not produced a token yet."""
        with self._cond:
            return sum(1 for t in self._tickets if t.first_token is None)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self._closing

    # ---- the event loop's side --------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job, loop: asyncio.AbstractEventLoop) -> Ticket:
        ticket = Ticket(job, loop)
        with self._cond:
            if not self.alive:
                raise APIError(503, "the server is shutting down" if self._closing else "the engine worker stopped",
                               code="unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})
            if self._rows + ticket.rows > self.capacity:
                self._count("dsexport_rejected_total", reason="queue_full")
                raise APIError(429, f"the server is busy: {self._rows} sequences running or queued, at most "
                               f"{self.capacity}; retry later", type="rate_limit_error", code="queue_full",
                               headers={"Retry-After": str(RETRY_AFTER_S)})
            self._rows += ticket.rows
            self._tickets.add(ticket)
            self._inbox.append(ticket)
            self._cond.notify()
        self._count("dsexport_prompt_tokens_total", job.prompt_tokens)
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        with self._cond:
            if ticket.outcome is None and not ticket.cancelled:
                ticket.cancelled = True
                self._cancels.append(ticket)
                self._cond.notify()

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout)

    # ---- the worker ---------------------------------------------------------------------------
    def _work(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._inbox or self._cancels or self._closing or (self.batch and self.batch.busy)):
                        self._cond.wait()
                    if self._closing:
                        break
                    new, self._inbox = self._inbox, []
                    cancels, self._cancels = self._cancels, []
                for ticket in cancels:
                    self._drop(ticket)
                if self.draft:
                    for ticket in new:
                        self._run_drafted(ticket)
                    continue
                for ticket in new:
                    self._join(ticket)
                if self.batch.busy:
                    self._step()
        except BaseException as e:  # a bug in the server: fail what is left, /health reports it
            log.exception("the serve worker stopped")
            self.failed = e
        finally:
            error = APIError(503, "the server is shutting down", code="unavailable")
            with self._cond:
                left = list(self._tickets)
                self._closing = True
            for ticket in left:
                self._finish(ticket, "error", error)

    def _join(self, ticket: Ticket) -> None:
        if ticket.cancelled:
            self._finish(ticket, "cancelled")
            return
        try:
            for choice in ticket.choices:
                choice.request = self.batch.add(choice.prompt, ticket.job.gen, seed_row=choice.seed_row,
                                                top_logprobs=ticket.job.logprobs)
                self._live[choice.request.id] = (ticket, choice)
        except UserError as e:  # checked before admission; a prompt the batch still refuses
            for choice in ticket.choices:
                if choice.request is not None:
                    self.batch.cancel(choice.request)
                    self._live.pop(choice.request.id, None)
            self._finish(ticket, "error", APIError(400, str(e)))

    def _drop(self, ticket: Ticket) -> None:
        """A cancelled ticket: its rows leave the batch at the next step."""
        if ticket.outcome is not None:
            return
        for choice in ticket.choices:
            if choice.request is not None and self.batch is not None:
                self.batch.cancel(choice.request)
        self._finish(ticket, "cancelled")

    def _step(self) -> None:
        start = time.perf_counter()
        before = self.cache.snapshot()
        try:
            events = self.batch.step()
        except Exception as e:  # noqa: BLE001  (any engine failure ends the batch's requests, not the server)
            self._engine_failed(e)
            return
        end = time.perf_counter()
        self.steps += 1
        self.running_rows = len(self.batch.running)
        self.cache.update(self.metrics)
        self._observe("dsexport_step_seconds", end - start)
        self._observe("dsexport_batch_rows", self.running_rows)  # the rows this step decoded
        self._count("dsexport_decode_steps_total")
        out: dict[Ticket, list[TokenOut]] = {}
        for event in events:
            entry = self._live.get(event.request.id)
            if entry is None:
                continue
            ticket, choice = entry
            if ticket.outcome == "cancelled":
                ticket.generated_after_cancel += 1
                continue
            if ticket.first_token is None:
                ticket.started, ticket.first_token, ticket.cache_baseline = start, end, before
            choice.generated += 1
            reason = FINISH.get(event.token.finish_reason) if event.token.finish_reason else None
            if reason:
                choice.finish_reason = reason
                self._live.pop(event.request.id, None)
            out.setdefault(ticket, []).append(TokenOut(choice.index, event.token.token_id, event.token.text, reason,
                                                       event.logprob, event.top))
        self._count("dsexport_generated_tokens_total", len(events))
        for ticket, tokens in out.items():
            ticket.post(("tokens", tokens))
            if all(c.finish_reason for c in ticket.choices):
                self._finish(ticket, "ok")
        # rows that left (finished or cancelled) no longer map to tickets
        for rid in [rid for rid, (t, c) in self._live.items() if t.outcome is not None]:
            self._live.pop(rid, None)

    def _engine_failed(self, e: Exception) -> None:
        log.error("the engine failed: %s", e, exc_info=not isinstance(e, UserError))
        error = APIError(500, f"the engine failed: {e}", type="server_error", code="engine_error")
        tickets = {t for t, _ in self._live.values()}
        self._live.clear()
        self.batch = ContinuousBatch(self.engine, max_rows=self.parallel)  # its cache may be half updated
        self.running_rows = 0
        for ticket in tickets:
            self._finish(ticket, "error", error)

    def _run_drafted(self, ticket: Ticket) -> None:
        """One sequence through Engine.stream, drafting with the MTP graph."""
        if ticket.cancelled:
            self._finish(ticket, "cancelled")
            return
        choice, gen = ticket.choices[0], ticket.job.gen
        s = gen.sampling
        self.cache.expect_reset()  # Engine.stream resets the paged backend's counters
        ticket.started = time.perf_counter()
        ticket.cache_baseline = self.cache.snapshot()
        stream = self.engine.stream(choice.prompt, max_new_tokens=gen.max_new_tokens, temperature=s.temperature,
                                    top_k=s.top_k, top_p=s.top_p, repetition_penalty=s.repetition_penalty, seed=s.seed,
                                    stop=list(gen.stop), ignore_eos=gen.ignore_eos)
        try:
            for event in stream:
                if ticket.cancelled:
                    break
                if ticket.first_token is None:
                    ticket.first_token = time.perf_counter()
                choice.generated += 1
                reason = FINISH.get(event.finish_reason) if event.finish_reason else None
                choice.finish_reason = reason
                ticket.post(("tokens", [TokenOut(0, event.token_id, event.text, reason)]))
        except Exception as e:  # noqa: BLE001  (as in _step)
            self._engine_failed_one(ticket, e)
            return
        finally:
            stream.close()
        self.cache.update(self.metrics)
        self.steps += 1
        stats = self.engine.last_draft_stats
        if stats is not None:
            ticket.summary["draft"] = stats.to_json()
            self._count("dsexport_draft_tokens_total", stats.drafted)
            self._count("dsexport_draft_accepted_total", stats.accepted)
        self._finish(ticket, "cancelled" if ticket.cancelled else "ok")

    def _engine_failed_one(self, ticket: Ticket, e: Exception) -> None:
        log.error("the engine failed: %s", e, exc_info=not isinstance(e, UserError))
        self._finish(ticket, "error", APIError(500, f"the engine failed: {e}", type="server_error",
                                               code="engine_error"))

    def _finish(self, ticket: Ticket, outcome: str, error: APIError | None = None) -> None:
        with self._cond:
            if ticket.outcome is not None:
                return
            ticket.outcome = outcome
            self._tickets.discard(ticket)
            self._rows -= ticket.rows
        ticket.finished = time.perf_counter()
        self._count("dsexport_generations_total", outcome=outcome)
        if outcome == "ok":
            ticket.summary.update(self._timings(ticket))
            if self.cache.enabled:
                ticket.summary["expert_cache"] = self.cache.since(ticket.cache_baseline)
            for c in ticket.choices:
                self._count("dsexport_choices_total", finish_reason=c.finish_reason or "length")
            ticket.post(("done", ticket.summary))
        elif outcome == "error":
            ticket.post(("error", error))
        self.recent.append(ticket)

    def _timings(self, ticket: Ticket) -> dict:
        # a generation that produced no token (a stop at once) has no first-token time
        ticket.started = ticket.started or ticket.finished
        ticket.first_token = ticket.first_token or ticket.finished
        queue_s = ticket.started - ticket.admitted
        prefill_s = ticket.first_token - ticket.started
        decode_s = ticket.finished - ticket.first_token
        after_first = ticket.generated - ticket.rows
        tpot = decode_s / after_first * ticket.rows if after_first > 0 else None
        for name, value in (("dsexport_queue_seconds", queue_s), ("dsexport_prefill_seconds", prefill_s),
                            ("dsexport_time_to_first_token_seconds", queue_s + prefill_s),
                            ("dsexport_request_seconds", ticket.finished - ticket.admitted)):
            self._observe(name, value)
        if tpot:
            self._observe("dsexport_time_per_output_token_seconds", tpot)
            self._observe("dsexport_request_tokens_per_second", 1.0 / tpot)
        return {"timings": {"queue_s": round(queue_s, 6), "prefill_s": round(prefill_s, 6),
                            "ttft_s": round(queue_s + prefill_s, 6), "decode_s": round(decode_s, 6),
                            "time_per_output_token_s": round(tpot, 6) if tpot else None,
                            "tokens_per_s": round(1.0 / tpot, 2) if tpot else None}}

    def _count(self, name: str, value: float = 1.0, **labels) -> None:
        if self.metrics is not None:
            self.metrics.inc(name, value, **labels)

    def _observe(self, name: str, value: float) -> None:
        if self.metrics is not None:
            self.metrics.observe(name, value)
