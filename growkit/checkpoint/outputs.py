"""Where a command may write: the one check every command runs on its output path before doing any work.

Why one module: `--overwrite` replaces a whole directory, so a wrong output path loses data. Every command (grow,
shrink, train, run, inspect) asks the same questions of its output:

- it must not be, lie inside, or contain any of the run's inputs (checkpoint, config, data, calibration text,
  tokenizer, recipe), compared after resolving symbolic links, nor be or contain the working directory;
- the output path itself must not be a symbolic link (growkit renames directories into place; replacing a link
  would silently redirect or orphan it), and its nearest existing ancestor must be a directory;
- `--overwrite` replaces only a directory that looks like a checkpoint (see `replaceable_problem`); anything else
  is refused with the entry that made it look like something else.

The replacement itself happens in `growkit.checkpoint.writer.publish_directory`, only once the new output is
complete, and says on stderr what it replaced.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from growkit.errors import GrowkitError

#: Files a checkpoint directory (ours or a Hugging Face one) or a growkit training run may hold.
CHECKPOINT_SUFFIXES = (".safetensors", ".json", ".jsonl", ".bin", ".model", ".txt", ".md", ".csv", ".png",
                       ".tiktoken")
CHECKPOINT_HIDDEN = (".gitattributes", ".incomplete", ".data-cache", ".cache")
_RUN_SUBDIR = re.compile(r"checkpoint-\d+")
_WEIGHTS = re.compile(r".*\.(safetensors|bin)|.*\.safetensors\.index\.json")


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _relation(out: Path, other: Path) -> str | None:
    """How the resolved output relates to a resolved input: "is", "is inside", "contains", or None."""
    if out == other:
        return "is"
    if out.is_relative_to(other):
        return "is inside"
    if other.is_relative_to(out):
        return "contains"
    return None


def check_path(out: Path, inputs: Iterable[str | Path | None], option: str = "output") -> None:
    """Refuse an output that overlaps an input or the working directory, is a symbolic link, or cannot be a
    directory because an ancestor is a file. `option` names the output in messages (e.g. "--out")."""
    out = Path(out)
    if out.is_symlink():
        raise GrowkitError(f"{out}: {option} is a symbolic link (to {os.readlink(out)}); give the real path, growkit "
                           "does not write through or replace links")
    for ancestor in out.parents:
        if ancestor.exists() or ancestor.is_symlink():
            if not ancestor.is_dir():
                raise GrowkitError(f"{out}: cannot create the {option}: {ancestor} is a file, not a directory")
            break
    where = _resolved(out)
    for item in inputs:
        if item is None or str(item).startswith("stdlib:"):
            continue
        # Both after resolving links and as written: an input that is a link (a Hub cache snapshot's files are)
        # lies where it points, and also where the link is.
        relation = (_relation(where, _resolved(Path(item)))
                    or _relation(Path(os.path.abspath(out)), Path(os.path.abspath(item))))
        if relation is not None:
            raise GrowkitError(f"{out}: {option} {relation} the input {item}; choose an output apart from every input")
    cwd = _resolved(Path.cwd())
    if where == cwd or cwd.is_relative_to(where):
        what = "is" if where == cwd else "contains"
        raise GrowkitError(f"{out}: {option} {what} the working directory; choose another output")


def replaceable_problem(directory: Path) -> str | None:
    """Why `directory` must not be replaced by --overwrite, or None if it may be.

    Replaceable: an empty directory, or one that holds growkit.json, or config.json with weights (a Hugging Face
    checkpoint), and nothing but files with checkpoint suffixes (CHECKPOINT_SUFFIXES), training checkpoints
    (`checkpoint-N/`) and the hidden entries tools put there (CHECKPOINT_HIDDEN). Anything else is someone's data.
    """
    if not directory.is_dir():
        return "it is not a directory"
    try:
        entries = sorted(directory.iterdir())
    except OSError as exc:
        return f"it cannot be listed ({exc.strerror or exc})"
    if not entries:
        return None
    names = {e.name for e in entries}
    if "growkit.json" not in names and not ("config.json" in names and any(_WEIGHTS.fullmatch(n) for n in names)):
        return "it holds neither growkit.json nor config.json with weights, so it is not a checkpoint"
    for entry in entries:
        if entry.name in CHECKPOINT_HIDDEN:
            continue
        if entry.is_symlink():
            return f"it holds the symbolic link {entry.name}"
        if entry.is_dir() and _RUN_SUBDIR.fullmatch(entry.name):
            continue
        if not entry.is_file() or not entry.name.endswith(CHECKPOINT_SUFFIXES):
            kind = "directory" if entry.is_dir() else "file"
            return f"it holds the {kind} {entry.name}, which is not part of a checkpoint"
    return None


def check_output(out: Path, inputs: Iterable[str | Path | None], overwrite: bool, option: str = "output") -> None:
    """`check_path`, then: an existing output needs --overwrite, and --overwrite replaces only a checkpoint."""
    out = Path(out)
    check_path(out, inputs, option)
    if not out.exists():
        return
    if not overwrite:
        raise GrowkitError(f"{out}: {option} already exists (pass --overwrite to replace it)")
    problem = replaceable_problem(out)
    if problem is not None:
        raise GrowkitError(f"{out}: --overwrite refused: {problem}; remove it yourself or choose another output")
