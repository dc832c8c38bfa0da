"""Results of a ticket as OpenAI responses: server-sent events for `stream: true`, one JSON object
otherwise; and the disconnect watch that cancels a generation nobody reads any more.

Starlette does not close a response's iterator when the client goes away, so the stream here is
its own ASGI response: it watches `receive()` for `http.disconnect` while it sends, and on a
disconnect cancels the ticket (the worker frees its rows before the next decode step) and stops.
"""

from __future__ import annotations

import asyncio
import json

from . import openai_api as api

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"


async def watch_disconnect(receive) -> None:
    """Returns when the client disconnects (any further body is ignored)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n\n"


class ChoiceState:
    def __init__(self):
        self.parts: list[str] = []
        self.entries: list = []  # (token, logprob, top) for logprobs
        self.finish_reason: str | None = None
        self.offset = 0  # legacy completions' text_offset
        self.tokens = 0


def _choice_payload(server, job: api.Job, index: int, text: str, entries: list | None, finish: str | None,
                    state: ChoiceState, chunk: bool) -> dict:
    logprobs = None
    if job.logprobs is not None and entries is not None:
        if job.endpoint == "chat":
            logprobs = api.chat_logprobs(entries, server.token_text)
        else:
            logprobs = api.completion_logprobs(entries, server.token_text, state.offset)
    if job.endpoint == "completion":
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
    if chunk:
        delta = {"content": text} if text or entries else {}
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    message = {"role": "assistant", "content": text, "refusal": None}
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}


async def collect(server, ticket) -> dict:
    """The whole response of a non-streaming request (raises its APIError)."""
    job = ticket.job
    states = {c.index: ChoiceState() for c in ticket.choices}
    while True:
        kind, payload = await ticket.next()
        if kind == "error":
            raise payload
        if kind == "tokens":
            for t in payload:
                s = states[t.choice]
                s.parts.append(t.text)
                s.tokens += 1
                if t.logprob is not None:
                    s.entries.append((t.token, t.logprob, t.top))
                if t.finish_reason:
                    s.finish_reason = t.finish_reason
        elif kind == "done":
            choices = [_choice_payload(server, job, i, "".join(s.parts), s.entries, s.finish_reason, s, chunk=False)
                       for i, s in sorted(states.items())]
            completion_tokens = sum(s.tokens for s in states.values())
            return {**api.envelope(job), "choices": choices, "usage": api.usage(job, completion_tokens), **payload}


class EventStream:
    """An ASGI response streaming a ticket as OpenAI's chunks, ending with `data: [DONE]`."""

    def __init__(self, server, ticket):
        self.server, self.ticket = server, ticket

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no")]})
        watcher = asyncio.ensure_future(self._watch(receive))
        try:
            async for data in self._chunks():
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the connection is gone
            pass
        finally:
            watcher.cancel()
            self.server.scheduler.cancel(self.ticket)  # nothing when it finished

    async def _watch(self, receive) -> None:
        await watch_disconnect(receive)
        self.server.scheduler.cancel(self.ticket)
        self.ticket.queue.put_nowait(("cancelled", None))  # ends _chunks

    async def _chunks(self):
        server, ticket, job = self.server, self.ticket, self.ticket.job
        chat = job.endpoint == "chat"
        head = api.envelope(job, chunk=True)
        if job.include_usage:
            head["usage"] = None
        states = {c.index: ChoiceState() for c in ticket.choices}
        if chat:  # the role first, as OpenAI does
            for index in states:
                yield _sse({**head, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]})
        held = None  # the last choice's finish chunk: sent with the response's statistics
        while True:
            item = await ticket.next(server.options.keepalive_s)
            if item is None:
                yield KEEPALIVE
                continue
            kind, payload = item
            if kind == "cancelled":
                return
            if kind == "error":
                yield _sse(payload.body())
                return
            if kind == "done":
                extras = payload
                if held is not None:
                    yield _sse({**head, "choices": [held], **({} if job.include_usage else extras)})
                if job.include_usage:
                    tokens = sum(s.tokens for s in states.values())
                    yield _sse({**head, "choices": [], "usage": api.usage(job, tokens), **extras})
                yield DONE
                return
            for t in payload:
                s = states[t.choice]
                s.tokens += 1
                entries = [(t.token, t.logprob, t.top)] if t.logprob is not None else None
                if t.text or entries is not None:
                    choice = _choice_payload(server, job, t.choice, t.text, entries, None, s, chunk=True)
                    yield _sse({**head, "choices": [choice]})
                if entries is not None and not chat:
                    s.offset += sum(len(server.token_text(e[0])[0]) for e in entries)
                if t.finish_reason:
                    s.finish_reason = t.finish_reason
                    last = _choice_payload(server, job, t.choice, "", None, t.finish_reason, s, chunk=True)
                    if all(x.finish_reason for x in states.values()):
                        held = last
                    else:
                        yield _sse({**head, "choices": [last]})
