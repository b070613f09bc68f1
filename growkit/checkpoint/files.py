"""The non-weight files a grown checkpoint keeps from its source: tokenizer and generation config."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

SUPPORT_FILES = (
    "generation_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
    "vocab.txt", "chat_template.json", "chat_template.jinja",
)
SUPPORT_GLOBS = ("tokenizer*",)


class _Sink(Protocol):
    def copy_file(self, src: Path, name: str | None = None) -> None: ...


def support_files(root: Path) -> list[Path]:
    """Tokenizer and generation files in `root` (weights, configs and cards are written anew, not copied)."""
    found = {root / n for n in SUPPORT_FILES if (root / n).is_file()}
    for pattern in SUPPORT_GLOBS:
        found.update(p for p in root.glob(pattern) if p.is_file())
    return sorted(found)


def copy_support_files(root: Path, sink: _Sink) -> list[Path]:
    files = support_files(root)
    for path in files:
        sink.copy_file(path)
    return files
