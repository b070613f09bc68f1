"""GGUF input: a llama.cpp `.gguf` file read through transformers' GGUF loader and dequantized to fp32.

GGUF weights are quantized in blocks and renamed and permuted relative to a Hugging Face checkpoint, so they are not
read lazily one tensor at a time as safetensors are: transformers dequantizes the whole model into memory once
(4 bytes per parameter, 540 MB for a 135M model) and growkit grows from that state dict. The config and the
tokenizer come from the file's metadata; the tokenizer and generation config are saved into a temporary directory
that is the checkpoint's `root`, so the output receives them like any checkpoint's support files.

Dequantization is exact arithmetic on the stored blocks, not a guess, but the weights were quantized: the output
carries the source's quantization error. That is said on stderr when the file is read and recorded in growkit.json.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr
from pathlib import Path
from typing import Any

import torch

from growkit.arch.registry import family_for
from growkit.checkpoint.reader import StateDictCheckpoint
from growkit.errors import GrowkitError

GGUF_EXTRA = "pip install 'growkit[gguf]'"
UNQUANTIZED = {"F32", "F64"}


class GGUFCheckpoint(StateDictCheckpoint):
    """A GGUF file's weights dequantized to fp32 in memory, with the config and tokenizer transformers reads from it."""

    def __init__(self, path: Path, state: dict[str, torch.Tensor], config: dict[str, Any],
                 tensor_types: dict[str, int], support_dir: tempfile.TemporaryDirectory[str] | None) -> None:
        super().__init__(state, config, source=str(path))
        self.tensor_types = tensor_types
        self._support_dir = support_dir  # removed with this object
        self.root = Path(support_dir.name) if support_dir is not None else None

    def origin(self) -> dict[str, Any]:
        return {"format": "gguf", "dequantized_from": self.tensor_types, "dequantized_to": "float32",
                "tokenizer": "from the GGUF metadata" if self.root is not None else "none in the GGUF file"}


def load_gguf(path: Path, config: Any = None, quiet: bool = False) -> GGUFCheckpoint:
    """Dequantize the GGUF file at `path`; its architecture is checked against growkit's families first, so an
    unsupported model is refused before any weight is dequantized. `quiet` hides the loader's progress bar."""
    if config is not None:
        raise GrowkitError(f"{path}: a GGUF file carries its own config; --config is not used with it")
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError:
        raise GrowkitError(f"{path}: reading GGUF needs the gguf package: {GGUF_EXTRA}") from None
    tensor_types, has_tokenizer = _file_facts(path)
    hf_config = _read_config(path)
    cfg = {k: v for k, v in hf_config.to_diff_dict().items() if k not in ("quantization_config", "_name_or_path")}
    family = family_for(cfg, str(path))
    with _progress_hidden(quiet):
        state = _dequantized_state(path, hf_config, family.tied(cfg))
    support_dir = _save_support_files(path, hf_config) if has_tokenizer else None
    ckpt = GGUFCheckpoint(path, state, cfg, tensor_types, support_dir)
    kinds = ", ".join(f"{name} x{count}" for name, count in tensor_types.items())
    quantized = set(tensor_types) - UNQUANTIZED
    print(f"growkit: note: {path}: weights dequantized to fp32 from GGUF tensors {kinds}"
          + ("; the output keeps their quantization error" if quantized else ""), file=sys.stderr)
    if support_dir is None:
        print(f"growkit: note: {path}: the GGUF file holds no tokenizer; the output has none", file=sys.stderr)
    return ckpt


def _read_config(path: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:  # the GGUF reader raises many types for a bad file; all mean the same to the user
        raise GrowkitError(f"{path}: not a valid GGUF file, truncated or corrupt ({_reason(exc)})") from None


@contextmanager
def _progress_hidden(hide: bool) -> Iterator[None]:
    """transformers' GGUF loader draws a plain tqdm bar on stderr, which no transformers setting turns off (and
    tqdm's own switch is read once, when tqdm is imported); under --quiet its stderr goes nowhere."""
    if not hide:
        yield
        return
    with open(os.devnull, "w") as sink, redirect_stderr(sink):
        yield


def _reason(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _file_facts(path: Path) -> tuple[dict[str, int], bool]:
    """How many tensors of each GGUF storage type (Q4_1, Q8_0, F32, ...) the file holds, most common first, and
    whether it has tokenizer metadata."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as exc:
        raise GrowkitError(f"{path}: not a valid GGUF file, truncated or corrupt ({_reason(exc)})") from None
    types = dict(Counter(t.tensor_type.name for t in reader.tensors).most_common())
    return types, "tokenizer.ggml.model" in reader.fields


def _dequantized_state(path: Path, hf_config: Any, tied: bool) -> dict[str, torch.Tensor]:
    """The fp32 state dict transformers makes of the file. A tensor the file lacks would be randomly initialised by
    `from_pretrained`, so a missing key is an error here, not a silently random weight."""
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=hf_config,
                                                           dtype=torch.float32, output_loading_info=True)
    except Exception as exc:
        raise GrowkitError(f"{path}: cannot dequantize its weights ({_reason(exc)})") from None
    head = {"lm_head.weight"} if tied else set()
    missing = sorted(set(info["missing_keys"]) - head)
    if missing:
        raise GrowkitError(f"{path}: the GGUF file lacks tensor(s) for {missing[0]}"
                           + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return {name: tensor for name, tensor in model.state_dict().items() if name not in head}


def _save_support_files(path: Path, hf_config: Any) -> tempfile.TemporaryDirectory[str] | None:
    """The GGUF's tokenizer and a generation config from its special tokens, saved as Hugging Face files."""
    from transformers import AutoTokenizer, GenerationConfig

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:
        raise GrowkitError(f"{path}: cannot convert its tokenizer ({_reason(exc)})") from None
    support = tempfile.TemporaryDirectory(prefix="growkit-gguf-")
    tokenizer.save_pretrained(support.name)
    GenerationConfig.from_model_config(hf_config).save_pretrained(support.name)
    return support
