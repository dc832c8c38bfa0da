"""The embedded model's two corpora, read offline, split into train and test.

- English: the King James Bible (1611, public domain), from Debian's `bible-kjv` and
  `bible-kjv-text` packages (`bible` prints it). Test split: every 25th chapter.
- Code: the Python standard library's top-level modules (Python Software Foundation License),
  from the interpreter running this script. Test split: every 25th file, by sorted name.

Two clearly different kinds of text, so that the pruning work can calibrate on one and
evaluate on the other. Both splits are deterministic.

    python training/data.py OUT_DIR      # writes {english,code}.{train,test}.txt
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

HOLD_OUT_EVERY = 25
DOC_SEPARATOR = "\n\x1e\n"  # ASCII record separator between chapters / files


def english_chapters() -> list[str]:
    if shutil.which("bible") is None:
        raise SystemExit("the English corpus needs Debian's bible-kjv and bible-kjv-text: "
                         "apt-get install -y bible-kjv bible-kjv-text")
    text = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    chapters: dict[str, list[str]] = {}
    for line in text.splitlines():
        match = re.match(r"^(\w+?\d*?)(\d+):(\d+) (.*)$", line)  # "Ge1:1 In the beginning ..."
        if match:
            book, chapter, _, verse = match.groups()
            chapters.setdefault(f"{book}{chapter}", []).append(verse)
    return [" ".join(verses) for verses in chapters.values()]


def code_files() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [p.read_text(errors="replace") for p in sorted(stdlib.glob("*.py"))]


def split(items: list[str]) -> tuple[list[str], list[str]]:
    test = [x for i, x in enumerate(items) if i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1]
    train = [x for i, x in enumerate(items) if i % HOLD_OUT_EVERY != HOLD_OUT_EVERY - 1]
    return train, test


def write_corpora(out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, items in (("english", english_chapters()), ("code", code_files())):
        train, test = split(items)
        for part, texts in (("train", train), ("test", test)):
            path = out / f"{name}.{part}.txt"
            path.write_text(DOC_SEPARATOR.join(texts))
            paths[f"{name}.{part}"] = path
    return paths


if __name__ == "__main__":
    for key, path in write_corpora(Path(sys.argv[1])).items():
        print(f"{key}: {path.stat().st_size / 1e6:.2f} MB")
