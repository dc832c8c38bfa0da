"""Calibration text: plain text, JSONL with a "text" field, or chat JSONL ("messages") rendered
with the checkpoint's chat template; cut into token sequences of at most seq_len.

Plain text is tokenized whole and cut into consecutive windows; when a file holds more windows
than its share of --samples, evenly spaced ones are taken, so the sample spans the file.
JSONL records are one sequence each (truncated to seq_len).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from dsexport.core.errors import UserError
from dsexport.runtime.tokenizer import BundleTokenizer

FORMATS = ("text", "jsonl", "chat")


@dataclasses.dataclass(frozen=True)
class DataSource:
    path: str
    format: str
    sha256: str
    sequences: int
    tokens: int


def detect_format(path: Path) -> str:
    if path.suffix not in (".jsonl", ".json"):
        return "text"
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.strip():
            try:
                first = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path}: line 1 is not JSON (a .jsonl file holds one JSON object per line)") from None
            if isinstance(first, dict) and "messages" in first:
                return "chat"
            if isinstance(first, dict) and "text" in first:
                return "jsonl"
            raise UserError(f"{path}: JSONL records need a \"text\" or a \"messages\" field")
    raise UserError(f"{path}: empty")


def _records(path: Path, fmt: str, tokenizer: BundleTokenizer) -> list[str | list[int]]:
    """Texts (JSONL "text") or token ids (chat records: the template's control tokens parsed,
    the messages' content encoded as text)."""
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}: line {n} is not JSON") from None
        if fmt == "jsonl":
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UserError(f"{path}: line {n} has no \"text\" string")
            out.append(record["text"])
        else:
            if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
                raise UserError(f"{path}: line {n} has no \"messages\" list")
            if not tokenizer.chat_template:
                raise UserError(f"{path}: chat records need a chat template, and the checkpoint has none")
            out.append(tokenizer.encode_chat(record["messages"], add_generation_prompt=False))
    return out


def _spread(items: list, count: int) -> list:
    """count items evenly spaced over the list (all of them when there are fewer)."""
    if len(items) <= count:
        return items
    return [items[int(i * len(items) / count)] for i in range(count)]


def load_sequences(paths: list[Path], tokenizer: BundleTokenizer, samples: int,
                   seq_len: int) -> tuple[list[list[int]], list[DataSource]]:
    """Up to `samples` token sequences of 2..seq_len tokens, shared out evenly over the files."""
    if not paths:
        raise UserError("no calibration data: pass --data FILE (text, or JSONL with \"text\" or \"messages\")")
    if samples < 1 or seq_len < 2:
        raise UserError("--samples must be at least 1 and --seq-len at least 2")
    sequences, sources = [], []
    for i, path in enumerate(paths):
        path = Path(path)
        if not path.is_file():
            raise UserError(f"calibration data {path} does not exist")
        share = samples // len(paths) + (1 if i < samples % len(paths) else 0)
        fmt = detect_format(path)
        if fmt == "text":
            ids = tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"))
            windows = [ids[s:s + seq_len] for s in range(0, len(ids), seq_len)]
        else:
            windows = [(tokenizer.encode(r) if isinstance(r, str) else r)[:seq_len] for r in _records(path, fmt, tokenizer)]
        chosen = [w for w in _spread([w for w in windows if len(w) >= 2], share)]
        if not chosen:
            raise UserError(f"{path}: no text to calibrate on (fewer than 2 tokens)")
        sequences += chosen
        sources.append(DataSource(str(path), fmt, hashlib.sha256(path.read_bytes()).hexdigest(), len(chosen),
                                  sum(len(w) for w in chosen)))
    return sequences, sources


def reload_sequences(profile, checkpoint: Path) -> list[list[int]]:
    """The token sequences a calibration profile was computed on, read again from the files it
    records (each must still hash to what it did then)."""
    paths = []
    for source in profile.data:
        path = Path(str(source.get("path", "")))
        if not path.is_file():
            raise UserError(f"the calibration profile's data {path} is gone; pass the text itself as --calib")
        if hashlib.sha256(path.read_bytes()).hexdigest() != source.get("sha256"):
            raise UserError(f"{path} changed since the calibration profile was made; pass the text itself as --calib")
        paths.append(path)
    sequences, _ = load_sequences(paths, BundleTokenizer.from_directory(checkpoint), profile.samples, profile.seq_len)
    return sequences
