"""The non-weight files a grown checkpoint keeps from its source: tokenizer and generation config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from growkit.errors import GrowkitError

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


def tokenizer_files(root: Path) -> list[Path]:
    """The support files that make up a tokenizer (all but the generation config)."""
    return [p for p in support_files(root) if p.name != "generation_config.json"]


def check_support_files(root: Path) -> None:
    """Refuse a tokenizer or generation file that is not valid JSON: copied as it is, it would make the grown
    checkpoint's tokenizer fail to load (and `--verify` fall back to random tokens)."""
    for path in support_files(root):
        if path.suffix != ".json":
            continue
        try:
            json.loads(path.read_bytes())
        except (ValueError, UnicodeDecodeError) as exc:
            raise GrowkitError(f"{path}: not valid JSON ({exc}); fix or remove it, growkit copies it into the "
                               "output") from None


def copy_support_files(root: Path, sink: _Sink) -> list[Path]:
    files = support_files(root)
    for path in files:
        sink.copy_file(path)
    return files
