"""The bundle's tokenizer: tokenizer.json through the `tokenizers` library, special tokens and
the chat template from tokenizer_config.json (or chat_template.jinja), and incremental
detokenization for streaming.

Untrusted input (docs/security.md):
- Only files the caller hands over are read (from a bundle: the ones its manifest lists).
- A chat template is code: it renders in Jinja's immutable sandbox (no attribute access to
  internals, no mutation of arguments), under a budget of template lines executed, wall-clock
  time and output size, so `{{ cycler.__init__.__globals__ }}` is refused and a loop of 10^10
  iterations stops with an error instead of hanging.
- User text is text: `encode` does not turn special-token strings typed by a user (the eos or bos
  text, role markers) into control tokens unless `parse_special=True`; `encode_chat` keeps the
  template's own control tokens and encodes each message's content as text, so content cannot
  open a new turn.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tokenizers import Tokenizer

from dsexport.core.errors import BundleError, UserError
from dsexport.core.jsonio import load_json

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")
MAX_TOKENIZER_BYTES = 256 << 20
MAX_TEMPLATE_CHARS = 1 << 20
TEMPLATE_LINE_BUDGET = 1_000_000  # template lines executed per render; real templates use thousands
TEMPLATE_SECONDS = 2.0
TEMPLATE_OUTPUT_CHARS = 4 << 20
_SENTINEL = "\x00dsexport-content-{}\x00"


class TemplateError(UserError):
    """A chat template that is unsafe, too costly, or broken."""

    exit_code = 4


def _token_text(entry) -> str | None:
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) and len(entry) < 1024 else None


class _Budget:
    """A trace function that stops a template after TEMPLATE_LINE_BUDGET lines or TEMPLATE_SECONDS."""

    def __init__(self):
        self.lines, self.deadline = 0, time.monotonic() + TEMPLATE_SECONDS

    def __call__(self, frame, event, arg):
        if event == "call" and frame.f_code.co_filename == "<template>":
            return self.line
        return None

    def line(self, frame, event, arg):
        if event == "line":
            self.lines += 1
            if self.lines > TEMPLATE_LINE_BUDGET or (self.lines % 4096 == 0 and time.monotonic() > self.deadline):
                raise TemplateError("the chat template exceeded its budget (too many steps or too slow); "
                                    "it looks like a runaway loop")
        return self.line


def _sandbox_class():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class LimitedSandbox(ImmutableSandboxedEnvironment):
        """The immutable sandbox, with `*` and `**` checked before they run: `'x' * 10**10` or
        `9 ** 9 ** 9` would exhaust memory or time in one step, before any output limit applies."""

        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * max(n, 0) > TEMPLATE_OUTPUT_CHARS:
                        raise TemplateError("the chat template builds a value larger than its output limit")
            if operator == "**" and isinstance(right, (int, float)) and isinstance(left, (int, float)) and (
                    abs(right) > 64 or abs(left) > 2**64):
                raise TemplateError("the chat template computes a power too large to be a template's business")
            return super().call_binop(context, operator, left, right)

    return LimitedSandbox


def render_template(source: str, variables: dict) -> str:
    """Render a chat template in the sandbox, within the budget."""
    try:
        from jinja2 import TemplateError as JinjaError
        from jinja2.sandbox import SecurityError
    except ImportError:  # pragma: no cover - a dependency of dsexport
        raise BundleError("chat templates need jinja2 (pip install jinja2)") from None
    env = _sandbox_class()(trim_blocks=True, lstrip_blocks=True, autoescape=False)
    budget, previous = _Budget(), sys.gettrace()
    try:
        template = env.from_string(source)
        parts, size = [], 0
        sys.settrace(budget)
        try:
            for chunk in template.generate(**variables):
                parts.append(chunk)
                size += len(chunk)
                if size > TEMPLATE_OUTPUT_CHARS:
                    raise TemplateError(f"the chat template's output exceeded {TEMPLATE_OUTPUT_CHARS} characters")
        finally:
            sys.settrace(previous)
        return "".join(parts)
    except SecurityError as e:
        raise TemplateError(f"the chat template tried something the sandbox forbids ({str(e)[:200]})") from None
    except JinjaError as e:
        raise TemplateError(f"the chat template cannot be rendered ({type(e).__name__}: {str(e)[:200]})") from None
    except TemplateError:
        raise
    except (OverflowError, RecursionError, TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError,
            IndexError, MemoryError) as e:
        raise TemplateError(f"the chat template failed ({type(e).__name__}: {str(e)[:200]})") from None


class BundleTokenizer:
    """files: {file name: path} of the tokenizer files to use (nothing else is opened)."""

    def __init__(self, files: dict[str, Path], where: str = "bundle"):
        path = files.get("tokenizer.json")
        if path is None:
            raise BundleError(f"{where}: no tokenizer.json; the bundle has no tokenizer (pass token ids instead)")
        if path.stat().st_size > MAX_TOKENIZER_BYTES:
            raise BundleError(f"{path}: larger than {MAX_TOKENIZER_BYTES >> 20} MiB; not a tokenizer this runtime loads")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises its own Exception subclass for any malformed file
            raise BundleError(f"{path}: not a readable tokenizer ({str(e).splitlines()[0][:200] if str(e) else e!r})") from None
        self.text_tokenizer = Tokenizer.from_str(self.tokenizer.to_str())
        self.text_tokenizer.encode_special_tokens = True  # special-token strings in user text stay text
        config = self._config(files.get("tokenizer_config.json"))
        self.chat_template = self._template(config, files)
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.add_bos = config.get("add_bos_token") is True
        self.bos_id = self.tokenizer.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = self.tokenizer.token_to_id(self.eos_token) if self.eos_token else None

    @classmethod
    def from_directory(cls, directory: Path) -> "BundleTokenizer":
        """A checkpoint's tokenizer: its tokenizer files that are regular files inside it."""
        from dsexport.core.files import confined

        files = {}
        for name in TOKENIZER_FILES:
            if (Path(directory) / name).exists() or (Path(directory) / name).is_symlink():
                files[name] = confined(directory, name, str(directory), BundleError)
        return cls(files, str(directory))

    @staticmethod
    def _config(path: Path | None) -> dict:
        if path is None:
            return {}
        config = load_json(path, BundleError, max_bytes=MAX_TOKENIZER_BYTES)
        if not isinstance(config, dict):
            raise BundleError(f"{path}: expected a JSON object")
        return config

    @staticmethod
    def _template(config: dict, files: dict[str, Path]) -> str | None:
        template = config.get("chat_template")
        if isinstance(template, list):  # [{name, template}, ...]: the default one
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                            None)
        if template is None and "chat_template.jinja" in files:  # transformers 5 layout
            path = files["chat_template.jinja"]
            if path.stat().st_size > MAX_TEMPLATE_CHARS:
                raise BundleError(f"{path}: a chat template larger than {MAX_TEMPLATE_CHARS} bytes")
            template = path.read_text(encoding="utf-8", errors="replace")
        if template is not None and (not isinstance(template, str) or len(template) > MAX_TEMPLATE_CHARS):
            raise BundleError("tokenizer_config.json: chat_template is not a template string of reasonable size")
        return template or None

    # ---- text <-> ids -------------------------------------------------------------------
    def encode(self, text: str, parse_special: bool = False) -> list[int]:
        """User text as tokens; special-token strings in it are text unless parse_special."""
        if not isinstance(text, str):
            raise UserError(f"expected text, got {type(text).__name__}")
        tok = self.tokenizer if parse_special else self.text_tokenizer
        ids = tok.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ---- chat ---------------------------------------------------------------------------
    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if not self.chat_template:
            raise BundleError("the bundle's tokenizer has no chat template")
        return render_template(self.chat_template, dict(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or ""))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self._render(_check_messages(messages), add_generation_prompt)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The conversation as tokens: the template's own control tokens parsed, every message's
        content encoded as text (so content cannot forge a turn)."""
        messages = _check_messages(messages)
        stand_in = [{**m, "content": _SENTINEL.format(n)} for n, m in enumerate(messages)]
        rendered = self._render(stand_in, add_generation_prompt)
        ids, position = [], 0
        for n, message in enumerate(messages):
            marker = _SENTINEL.format(n)
            at = rendered.find(marker, position)
            if at < 0:
                raise TemplateError(f"the chat template transforms or drops message {n}'s content, so dsexport "
                                    "cannot keep it as text; use a template that inserts content as it is")
            ids += self.tokenizer.encode(rendered[position:at], add_special_tokens=False).ids
            ids += self.text_tokenizer.encode(message["content"], add_special_tokens=False).ids
            position = at + len(marker)
        return ids + self.tokenizer.encode(rendered[position:], add_special_tokens=False).ids


def _check_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise UserError("messages must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f"message {i}: expected {{\"role\": str, \"content\": str}}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


class StreamDecoder:
    """Decodes a growing list of token ids; `text` holds back a trailing partial UTF-8 sequence
    (shown as U+FFFD) until the next token completes it, `final_text` does not."""

    def __init__(self, tokenizer: BundleTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self.text = text

    @property
    def final_text(self) -> str:
        return self.tokenizer.decode(self.ids)
