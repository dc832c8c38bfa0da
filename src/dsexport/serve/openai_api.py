"""OpenAI-compatible requests in, OpenAI-shaped responses out (docs/serve.md has the table of
supported, ignored and rejected fields).

`parse_chat` and `parse_completion` turn a request body into a `Job` (prompt token ids, a
GenerationConfig, n, streaming and logprob options) or raise `APIError` with the status and the
`{"error": {message, type, param, code}}` body OpenAI's clients expect. Nothing here runs the
model; the scheduler (serve/scheduler.py) does.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

from dsexport import __version__
from dsexport.core.errors import BundleError, UserError
from dsexport.runtime.decode import GenerationConfig
from dsexport.runtime.sampling import MAX_SEED, SamplingParams

MAX_N = 16
MAX_STOPS = 16
MAX_TOP_LOGPROBS = 20  # chat; legacy completions: 5, as OpenAI
FINGERPRINT = f"dsexport-{__version__}"
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}

# fields that change nothing here (OpenAI bookkeeping); documented as ignored
IGNORED = {"user", "store", "metadata", "service_tier", "parallel_tool_calls", "prompt_cache_key", "safety_identifier"}
COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream", "stream_options",
          "frequency_penalty", "presence_penalty", "repetition_penalty", "ignore_eos", "logprobs", "logit_bias"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice",
                        "functions", "function_call", "modalities"}
COMPLETION_FIELDS = COMMON | {"prompt", "echo", "best_of", "suffix"}
TEMPLATE_FIELDS = {"chat_template", "chat_template_kwargs", "template"}


class APIError(Exception):
    """An error response: HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_user_error(e: UserError, params: tuple[str, ...] = ()) -> APIError:
    """A runtime UserError (one line, e.g. "top_p must be in (0, 1], got 2") as a 400 naming the
    field its message starts with."""
    message = str(e)
    first = message.split(" ", 1)[0]
    return invalid(message, param=first if first in params else None)


@dataclasses.dataclass
class Job:
    endpoint: str  # "chat" | "completion"
    model: str
    prompts: list[list[int]]
    n: int
    gen: GenerationConfig
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # None: none; k: the chosen token's and the k most likely
    id: str = ""
    created: int = 0

    def __post_init__(self):
        prefix = "chatcmpl" if self.endpoint == "chat" else "cmpl"
        self.id = self.id or f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.created = self.created or int(time.time())

    @property
    def choices(self) -> list[tuple[int, list[int], int]]:
        """(choice index, prompt ids, seed row): prompt p's j-th sample is choice p * n + j."""
        return [(p * self.n + j, ids, j) for p, ids in enumerate(self.prompts) for j in range(self.n)]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


@dataclasses.dataclass
class Limits:
    model: str  # the one model id served
    max_context: int
    capacity: int  # rows the server admits at once (parallel + max_queue)
    draft: bool = False  # MTP drafting: one sequence at a time, no logprobs


# ---- field access ----------------------------------------------------------------------------
def _get(body: dict, name: str, kinds: tuple, what: str, default=None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise invalid(f"{name} must be {what}, got {type(value).__name__}", param=name)
    return value


def _int(body: dict, name: str, lo: int, hi: int, default=None):
    if body.get(name) is None:
        return default
    value = _get(body, name, (int,), "an integer")
    if not lo <= value <= hi:
        raise invalid(f"{name} must be between {lo} and {hi}, got {value}", param=name)
    return value


def _num(body: dict, name: str, lo: float, hi: float, default: float) -> float:
    if body.get(name) is None:
        return default
    value = _get(body, name, (int, float), "a number")
    if not lo <= value <= hi:  # NaN fails too
        raise invalid(f"{name} must be between {lo} and {hi}, got {value}", param=name)
    return float(value)


def _bool(body: dict, name: str, default: bool = False) -> bool:
    return _get(body, name, (bool,), "true or false", default)


def repetition_penalty(body: dict) -> float:
    """dsexport's sampler has CTRL's multiplicative repetition penalty (every token already seen is
    penalized once). OpenAI's additive presence_penalty p and frequency_penalty f in [-2, 2] map to
    it through s = p + f: penalty 1 + s/2 for s >= 0 (up to 3), 1 / (1 - s/2) for s < 0 (down to
    1/3). `repetition_penalty` sets it directly and cannot be combined with them."""
    presence = _num(body, "presence_penalty", -2.0, 2.0, 0.0)
    frequency = _num(body, "frequency_penalty", -2.0, 2.0, 0.0)
    if body.get("repetition_penalty") is not None:
        if presence or frequency:
            raise invalid("pass repetition_penalty or presence_penalty/frequency_penalty, not both",
                          param="repetition_penalty")
        return _num(body, "repetition_penalty", 0.01, 100.0, 1.0)
    s = presence + frequency
    return 1.0 + s / 2 if s >= 0 else 1.0 / (1.0 - s / 2)


def _check_fields(body: dict, allowed: set[str]) -> None:
    for name in sorted(body):
        if name in TEMPLATE_FIELDS:
            raise invalid(f"{name}: a chat template is never accepted from a request; the bundle's own template is "
                          "used", param=name)
    unknown = sorted(set(body) - allowed - IGNORED)
    if unknown:
        raise invalid(f"unrecognized request argument supplied: {', '.join(unknown)}", param=unknown[0])
    unsupported = {
        "tools": "tool calling is not supported", "functions": "function calling is not supported",
        "logit_bias": "logit_bias is not supported",
    }
    for name, why in unsupported.items():
        if body.get(name):  # absent, null, [] and {} are fine
            raise invalid(f"{why} by dsexport serve", param=name)
    for name in ("tool_choice", "function_call"):
        if body.get(name) not in (None, "none"):
            raise invalid(f"{name}: tool calling is not supported by dsexport serve", param=name)
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        kind = fmt.get("type") if isinstance(fmt, dict) else fmt
        raise invalid(f"response_format {kind!r} is not supported (structured output); only {{\"type\": \"text\"}}",
                      param="response_format")
    if body.get("modalities") not in (None, ["text"]):
        raise invalid("only text output is supported", param="modalities")


def _model(body: dict, limits: Limits) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("you must provide a model parameter", param="model")
    if model != limits.model:
        raise APIError(404, f"The model `{model}` does not exist; this server serves `{limits.model}`",
                       param="model", code="model_not_found")
    return model


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("stop must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOPS or any(len(s) > 1024 for s in stops):
        raise invalid(f"stop takes at most {MAX_STOPS} strings of at most 1024 characters", param="stop")
    return tuple(s for s in stops if s)


def _generation(body: dict, limits: Limits, max_tokens: int | None, ignore_eos: bool) -> GenerationConfig:
    temperature = _num(body, "temperature", 0.0, 2.0, 1.0)
    top_p = _num(body, "top_p", 0.0, 1.0, 1.0)
    top_k = _int(body, "top_k", 0, 1 << 30, 0)
    seed = _int(body, "seed", -(1 << 63), 1 << 64, None)
    if seed is not None:
        seed %= MAX_SEED + 1  # OpenAI takes any 64-bit integer; the sampler's streams take 0..2**63-1
    penalty = repetition_penalty(body)
    try:
        # top_p 0 (allowed by OpenAI) keeps only the most likely token
        sampling = SamplingParams(temperature, top_k, max(top_p, 1e-9), penalty, seed)
    except UserError as e:
        raise from_user_error(e, ("temperature", "top_k", "top_p", "repetition_penalty", "seed")) from None
    limit = limits.max_context if max_tokens is None else min(max_tokens, limits.max_context)
    return GenerationConfig(limit, sampling, _stops(body), ignore_eos)


def _common(body: dict, limits: Limits, endpoint: str, prompts: list[list[int]], max_tokens: int | None,
            logprobs: int | None) -> Job:
    n = _int(body, "n", 1, MAX_N, 1)
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not stream:
        raise invalid("stream_options is only allowed when stream is true", param="stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}):
        raise invalid("stream_options takes include_usage", param="stream_options")
    include_usage = _bool(options or {}, "include_usage")
    for ids in prompts:
        if len(ids) >= limits.max_context:
            raise invalid(f"This model's maximum context length is {limits.max_context} tokens. However, your "
                          f"{'messages' if endpoint == 'chat' else 'prompt'} resulted in {len(ids)} tokens. Please "
                          "reduce the length of the input.", param="messages" if endpoint == "chat" else "prompt",
                          code="context_length_exceeded")
    rows = n * len(prompts)
    if rows > limits.capacity:
        raise invalid(f"this request asks for {rows} sequences; the server runs at most {limits.capacity} at once "
                      "(--parallel plus --max-queue)", param="n")
    if limits.draft and (rows > 1 or logprobs is not None):
        raise invalid("with --draft mtp the server generates one sequence per request and no logprobs (n=1, one "
                      "prompt, logprobs off)", param="n" if rows > 1 else "logprobs")
    gen = _generation(body, limits, max_tokens, _bool(body, "ignore_eos"))
    return Job(endpoint, _model(body, limits), prompts, n, gen, stream, include_usage, logprobs)


# ---- the two generation endpoints --------------------------------------------------------------
def _message_text(i: int, message) -> dict:
    if not isinstance(message, dict):
        raise invalid(f"messages[{i}] must be an object with role and content", param=f"messages[{i}]")
    role = message.get("role")
    if role not in ("system", "developer", "user", "assistant"):
        why = "tool messages need tool calling, which is not supported" if role == "tool" else f"unknown role {role!r}"
        raise invalid(f"messages[{i}]: {why}", param=f"messages[{i}].role")
    if message.get("tool_calls") or message.get("function_call"):
        raise invalid(f"messages[{i}]: tool calls are not supported", param=f"messages[{i}].tool_calls")
    content = message.get("content")
    if content is None and role == "assistant":
        content = ""
    if isinstance(content, list):  # content parts: text only
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise invalid(f"messages[{i}]: content part {kind!r} is not supported (text only)",
                              param=f"messages[{i}].content")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise invalid(f"messages[{i}].content must be a string or a list of text parts", param=f"messages[{i}].content")
    return {"role": "system" if role == "developer" else role, "content": content}


def parse_chat(body: Any, engine, limits: Limits) -> Job:
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    _check_fields(body, CHAT_FIELDS)
    _model(body, limits)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list", param="messages")
    messages = [_message_text(i, m) for i, m in enumerate(messages)]
    max_tokens = _int(body, "max_tokens", 1, 1 << 30)
    max_completion = _int(body, "max_completion_tokens", 1, 1 << 30)
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise invalid("max_tokens and max_completion_tokens disagree; pass one", param="max_completion_tokens")
    logprobs = None
    if _bool(body, "logprobs"):
        logprobs = _int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, 0)
    elif body.get("top_logprobs") is not None:
        raise invalid("top_logprobs needs logprobs: true", param="top_logprobs")
    try:
        ids = engine.encode_chat(messages)  # control tokens from the template, content as text
    except BundleError as e:
        raise invalid(f"this model cannot chat: {e}", param="messages") from None
    except UserError as e:
        raise invalid(str(e), param="messages") from None
    return _common(body, limits, "chat", [ids], max_completion or max_tokens, logprobs)


def _prompts(prompt, engine) -> list[list[int]]:
    """OpenAI's four prompt forms: text, a list of texts, token ids, a list of token-id lists."""
    def ids(item) -> list[int]:
        if isinstance(item, str):
            return engine.prompt_ids(item)  # special-token strings stay text
        if isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            return engine.prompt_ids(item)
        raise invalid("prompt must be a string, a list of strings, a list of token ids or a list of such lists",
                      param="prompt")

    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        items = prompt
    else:
        items = [prompt]
    try:
        return [ids(item) for item in items]
    except BundleError as e:  # no tokenizer: token ids only
        raise invalid(str(e), param="prompt") from None
    except UserError as e:
        raise invalid(str(e), param="prompt") from None


def parse_completion(body: Any, engine, limits: Limits) -> Job:
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    _check_fields(body, COMPLETION_FIELDS)
    _model(body, limits)
    if body.get("prompt") is None:
        raise invalid("you must provide a prompt", param="prompt")
    if _bool(body, "echo"):
        raise invalid("echo is not supported", param="echo")
    if body.get("suffix"):
        raise invalid("suffix (insertion) is not supported", param="suffix")
    best_of = _int(body, "best_of", 1, MAX_N, None)
    if best_of is not None and best_of != (body.get("n") or 1):
        raise invalid("best_of other than n is not supported", param="best_of")
    logprobs = _int(body, "logprobs", 0, 5, None)
    prompts = _prompts(body["prompt"], engine)
    return _common(body, limits, "completion", prompts, _int(body, "max_tokens", 1, 1 << 30, 16), logprobs)


# ---- response shapes ---------------------------------------------------------------------------
class TokenText:
    """A token's text and bytes for logprobs (cached)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer.tokenizer if tokenizer is not None else None
        self._cache: dict[int, tuple[str, list[int]]] = {}
        self._byte_decoder = _byte_decoder()

    def __call__(self, token: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token)
        if hit is None:
            if self.tokenizer is None:
                hit = (f"<{token}>", [])
            else:
                text = self.tokenizer.decode([token], skip_special_tokens=False)
                raw = self.tokenizer.id_to_token(token) or ""
                if raw and all(c in self._byte_decoder for c in raw) and "\ufffd" in text:
                    data = bytes(self._byte_decoder[c] for c in raw)  # byte-level BPE: the exact bytes
                else:
                    data = text.encode("utf-8")
                hit = (text, list(data))
            self._cache[token] = hit
        return hit


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable stand-in character -> byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def chat_logprobs(entries: list, text: TokenText) -> dict:
    content = []
    for token, logprob, top in entries:
        tok, data = text(token)
        content.append({"token": tok, "logprob": logprob, "bytes": data,
                        "top_logprobs": [{"token": text(t)[0], "logprob": lp, "bytes": text(t)[1]} for t, lp in top or []]})
    return {"content": content, "refusal": None}


def completion_logprobs(entries: list, text: TokenText, offset: int = 0) -> dict:
    tokens, values, tops, offsets = [], [], [], []
    for token, logprob, top in entries:
        tok = text(token)[0]
        tokens.append(tok)
        values.append(logprob)
        tops.append({text(t)[0]: lp for t, lp in top or []})
        offsets.append(offset)
        offset += len(tok)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def envelope(job: Job, chunk: bool = False) -> dict:
    if job.endpoint == "chat":
        kind = "chat.completion.chunk" if chunk else "chat.completion"
    else:
        kind = "text_completion"
    return {"id": job.id, "object": kind, "created": job.created, "model": job.model,
            "system_fingerprint": FINGERPRINT}


def usage(job: Job, completion_tokens: int) -> dict:
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": job.prompt_tokens + completion_tokens}


def model_entry(model: str, created: int) -> dict:
    return {"id": model, "object": "model", "created": created, "owned_by": "dsexport"}
