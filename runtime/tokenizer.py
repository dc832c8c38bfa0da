"""The bundle's tokenizer: tokenizer.json through the `tokenizers` library, special tokens and
the chat template from tokenizer_config.json, and incremental detokenization for streaming."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from dsexport.errors import BundleError


def _token_text(entry) -> str | None:
    if isinstance(entry, dict):
        return entry.get("content")
    return entry


class BundleTokenizer:
    def __init__(self, directory: Path):
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise BundleError(f"{path}: not found; the bundle has no tokenizer (pass token ids instead)")
        self.tokenizer = Tokenizer.from_file(str(path))
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.chat_template: str | None = config.get("chat_template")
        if not self.chat_template and (directory / "chat_template.jinja").is_file():
            self.chat_template = (directory / "chat_template.jinja").read_text()  # transformers 5 layout
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.add_bos = bool(config.get("add_bos_token", False))
        self.bos_id = self.tokenizer.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = self.tokenizer.token_to_id(self.eos_token) if self.eos_token else None

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise BundleError("the bundle's tokenizer_config.json has no chat_template")
        try:
            import jinja2
        except ImportError:  # pragma: no cover - jinja2 ships with most Python installs
            raise BundleError("chat templates need jinja2 (pip install jinja2)") from None
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "",
        )


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
