"""Lazy checkpoint reading: a Hugging Face directory, a bare `.safetensors` file, or an in-memory state dict.

Tensors are read one at a time (safetensors memory-maps the file), so growing a checkpoint never holds the whole
source in memory. Every read is converted to fp32, because growth arithmetic (e.g. `W/3`) is not exact in bf16.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from growkit.arch.registry import infer_config, stored_names
from growkit.errors import GrowkitError

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


class Checkpoint:
    """Read-only view of a checkpoint's tensors and config; subclasses differ only in where bytes come from."""

    config: dict[str, Any]
    source: str
    root: Path | None
    #: For a config inferred from tensor shapes: {"fields": what was inferred, "defaulted": fields left to
    #: transformers' defaults}; None when the config was given or found. Recorded in growkit.json.
    config_inferred: dict[str, Any] | None = None

    def names(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, name: str) -> torch.dtype:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name` as a new fp32 tensor."""
        raise NotImplementedError

    @property
    def model_type(self) -> str:
        model_type = self.config.get("model_type")
        if not model_type:
            raise GrowkitError(f"{self.source}: config has no model_type")
        return str(model_type)

    def origin(self) -> dict[str, Any]:
        """What reading did to the source that its outputs should record (e.g. dequantization); empty for plain
        safetensors and state dicts."""
        return {}

    def storage_dtype(self) -> torch.dtype:
        """The dtype most of the floating-point weights are stored in (the default output dtype)."""
        counts = Counter(self.dtype(n) for n in self.names() if self.dtype(n).is_floating_point)
        return counts.most_common(1)[0][0] if counts else torch.float32


class SafetensorsCheckpoint(Checkpoint):
    """One or more safetensors files; a sharded index maps names to files.

    Headers are validated by the safetensors library when the files are opened; tensor bytes are then read with
    plain positioned reads into fresh buffers rather than through a memory map, so the source's pages never count
    towards this process's resident memory (a memory-mapped multi-GB source would, page by page, as it is read).
    """

    def __init__(self, files: list[Path], config: dict[str, Any], source: str, root: Path | None) -> None:
        self.config = config
        self.source = source
        self.root = root
        self._where: dict[str, Path] = {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._span: dict[str, tuple[int, int]] = {}
        for file in files:
            handle = _open_safetensors(file)
            spans = _data_spans(file)
            for name in handle.keys():
                if name in self._where:
                    raise GrowkitError(f"{file}: tensor {name} also appears in {self._where[name]}")
                sl = handle.get_slice(name)
                shape, dtype = tuple(sl.get_shape()), _torch_dtype(file, name, sl.get_dtype())
                if name not in spans:
                    raise GrowkitError(f"{file}: tensor {name} has no data offsets in the header")
                begin, end = spans[name]
                if end - begin != dtype.itemsize * _numel(shape):
                    raise GrowkitError(f"{file}: tensor {name} has {end - begin} bytes, but shape {list(shape)} "
                                       f"of {dtype} needs {dtype.itemsize * _numel(shape)}")
                self._where[name] = file
                self._meta[name] = (shape, dtype)
                self._span[name] = (begin, end)
            del handle

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][1]

    def get(self, name: str) -> torch.Tensor:
        file = self._where[name]
        shape, dtype = self._meta[name]
        begin, end = self._span[name]
        raw = torch.empty(end - begin, dtype=torch.uint8)
        try:
            with open(file, "rb", buffering=0) as fh:
                fh.seek(begin)
                view, done = memoryview(raw.numpy()), 0
                while done < len(view):
                    n = fh.readinto(view[done:])
                    if not n:
                        break
                    done += n
        except OSError as exc:
            raise GrowkitError(f"{file}: cannot read tensor {name} ({exc.strerror or exc})") from None
        if done != end - begin:
            raise GrowkitError(f"{file}: file ends inside tensor {name} (was it truncated while growing?)")
        tensor = raw.view(dtype).reshape(shape)
        if sys.byteorder != "little" and dtype.itemsize > 1:  # safetensors stores little-endian
            tensor = torch.from_numpy(tensor.numpy().byteswap())
        return tensor.to(torch.float32)  # a new tensor either way: `raw` belongs to this call alone


class StateDictCheckpoint(Checkpoint):
    """An in-memory model's state dict (for `grow_model`); tensors are already resident."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], config: dict[str, Any], source: str = "<model>") -> None:
        self.config = config
        self.source = source
        self.root = None
        self._sd = dict(state_dict)

    def names(self) -> list[str]:
        return list(self._sd)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._sd[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._sd[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return self._sd[name].detach().to("cpu", torch.float32, copy=True)


class RenamedCheckpoint(Checkpoint):
    """Another checkpoint's tensors under the names the architecture specs use, for a layout that spells them
    differently but that transformers loads all the same (GPT-2 without `transformer.`); renamed once, here, so
    growth, verification, calibration and the output all see one spelling."""

    def __init__(self, inner: Checkpoint, stored: dict[str, str]) -> None:
        self.inner, self._stored = inner, stored
        self._canonical = {v: k for k, v in stored.items()}
        self.config, self.source, self.root = inner.config, inner.source, inner.root
        self.config_inferred = inner.config_inferred

    def names(self) -> list[str]:
        return [self._canonical.get(n, n) for n in self.inner.names()]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.inner.shape(self._stored.get(name, name))

    def dtype(self, name: str) -> torch.dtype:
        return self.inner.dtype(self._stored.get(name, name))

    def get(self, name: str) -> torch.Tensor:
        return self.inner.get(self._stored.get(name, name))

    def origin(self) -> dict[str, Any]:
        return self.inner.origin()


def _canonical(ckpt: Checkpoint) -> Checkpoint:
    from growkit.checkpoint.experts import split_fused_experts

    renames = stored_names(ckpt.names())
    return split_fused_experts(RenamedCheckpoint(ckpt, renames) if renames else ckpt)


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def _torch_dtype(file: Path, name: str, code: str) -> torch.dtype:
    if code not in _DTYPES:
        raise GrowkitError(f"{file}: tensor {name} has unsupported dtype {code}")
    return _DTYPES[code]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _data_spans(file: Path) -> dict[str, tuple[int, int]]:
    """Absolute byte ranges of every tensor, from a header the safetensors library has already validated."""
    try:
        with open(file, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
        base = 8 + size
        return {name: (base + int(info["data_offsets"][0]), base + int(info["data_offsets"][1]))
                for name, info in header.items() if name != "__metadata__"}
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError) as exc:
        raise GrowkitError(f"{file}: not a valid safetensors file (header: {exc})") from None


def _open_safetensors(file: Path) -> Any:
    """Open a safetensors file, turning every format problem into a one-line GrowkitError naming the file."""
    try:
        return safe_open(str(file), framework="pt")
    except FileNotFoundError:
        raise GrowkitError(f"{file}: file not found") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise GrowkitError(f"{file}: not a valid safetensors file, truncated or corrupt ({exc})") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # ValueError covers bad JSON and bad UTF-8
        raise GrowkitError(f"{path}: cannot read JSON ({exc})") from None
    if not isinstance(data, dict):
        raise GrowkitError(f"{path}: expected a JSON object")
    return data


def _config_for_file(file: Path, config: str | Path | Mapping[str, Any] | None, handle_meta: dict[str, str],
                     shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Config for a bare .safetensors file: explicit, then file metadata, then config.json beside it, then inferred
    (announced on stderr; the second value says what was inferred, None for a config that was not)."""
    if isinstance(config, Mapping):
        return dict(config), None
    if config is not None:
        return _read_json(Path(config)), None
    if "config" in handle_meta:
        try:
            meta_config = json.loads(handle_meta["config"])
        except json.JSONDecodeError:
            raise GrowkitError(f"{file}: the 'config' entry of its metadata is not valid JSON") from None
        if not isinstance(meta_config, dict):
            raise GrowkitError(f"{file}: the 'config' entry of its metadata is not a JSON object")
        return meta_config, None
    beside = file.parent / "config.json"
    if beside.is_file():
        return _read_json(beside), None
    inferred, defaulted = infer_config(shapes, source=str(file))
    fields = ", ".join(f"{k}={v}" for k, v in inferred.items() if k != "architectures")
    print(f"growkit: note: {file} has no config; inferred from its tensor shapes: {fields}; not recorded in the "
          f"weights, so transformers' defaults apply: {', '.join(defaulted)} (pass --config if they differ)",
          file=sys.stderr)
    return inferred, {"fields": inferred, "defaulted": list(defaulted)}


def load_checkpoint(path: str | Path, config: str | Path | Mapping[str, Any] | None = None,
                    allow_pickle: bool = False, quiet: bool = False) -> Checkpoint:
    """Open a checkpoint lazily; nothing but headers is read here.

    `path` is a Hugging Face directory (config.json + model.safetensors or a sharded index), a bare `.safetensors`
    file, or a `.gguf` file (dequantized into memory at once, see `growkit.checkpoint.gguf`). Pickle checkpoints
    (`pytorch_model.bin`) are refused unless `allow_pickle` is set, and then loaded with
    `torch.load(weights_only=True)`, which executes no code. Tensor names come out as the architecture specs spell
    them, whatever equivalent spelling the file uses. `quiet` hides progress bars.
    """
    return _canonical(_open_checkpoint(Path(path), config, allow_pickle, quiet))


def _open_checkpoint(path: Path, config: str | Path | Mapping[str, Any] | None, allow_pickle: bool,
                     quiet: bool = False) -> Checkpoint:
    if not path.exists():
        raise GrowkitError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix == ".bin" or path.name.endswith(".bin.index.json"):
            return _load_pickle(path.parent, [path], config, allow_pickle, root=None)
        if path.suffix == ".gguf":
            from growkit.checkpoint.gguf import load_gguf

            return load_gguf(path, config, quiet=quiet)
        if path.suffix != ".safetensors":
            raise GrowkitError(f"{path}: expected a .safetensors or .gguf file or a checkpoint directory")
        handle = _open_safetensors(path)
        shapes = {n: tuple(handle.get_slice(n).get_shape()) for n in handle.keys()}
        canonical = {v: k for k, v in stored_names(list(shapes)).items()}
        shapes = {canonical.get(n, n): shape for n, shape in shapes.items()}
        cfg, inferred = _config_for_file(path, config, handle.metadata() or {}, shapes)
        ckpt = SafetensorsCheckpoint([path], cfg, str(path), root=path.parent)
        ckpt.config_inferred = inferred
        return ckpt

    cfg = _directory_config(path, config)
    index = path / WEIGHTS_INDEX_NAME
    single = path / WEIGHTS_NAME
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise GrowkitError(f"{index}: no weight_map")
        if single.is_file() and set(weight_map.values()) != {WEIGHTS_NAME}:
            # transformers loads model.safetensors and ignores the index; reading the index would grow other weights
            raise GrowkitError(f"{path}: both {WEIGHTS_NAME} and {WEIGHTS_INDEX_NAME}, which names other files "
                               f"(transformers would load {WEIGHTS_NAME}); remove the stale one")
        odd = [f for f in weight_map.values() if not isinstance(f, str) or Path(f).name != f or f in ("", ".", "..")]
        if odd:
            raise GrowkitError(f"{index}: weight_map names {odd[0]!r}, not a file name in the checkpoint directory")
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise GrowkitError(f"{index}: shard file missing: {missing[0]}")
        ckpt = SafetensorsCheckpoint(files, cfg, str(path), root=path)
        absent = sorted(set(weight_map) - set(ckpt.names()))
        if absent:
            raise GrowkitError(f"{index}: lists tensor {absent[0]} that no shard contains")
        return ckpt
    if single.is_file():
        return SafetensorsCheckpoint([single], cfg, str(path), root=path)
    loose = sorted(path.glob("*.safetensors"))
    if loose:
        return SafetensorsCheckpoint(loose, cfg, str(path), root=path)
    pickles = [path / n for n in PICKLE_NAMES if (path / n).is_file()]
    if pickles:
        return _load_pickle(path, pickles, cfg, allow_pickle, root=path)
    raise GrowkitError(f"{path}: no model.safetensors, sharded index or *.safetensors file found")


def _directory_config(path: Path, config: str | Path | Mapping[str, Any] | None) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    if config is not None:
        return _read_json(Path(config))
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise GrowkitError(f"{path}: no config.json (pass --config, or give the .safetensors file to infer one)")
    return _read_json(cfg_file)


def _torch_load(file: Path) -> Any:
    """torch.load with weights_only (no code runs), memory-mapped unless the file predates the zip format."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap can only be used" not in str(exc):
            raise
        return torch.load(file, map_location="cpu", weights_only=True)


def _pickle_reason(exc: Exception) -> str:
    """The one informative line of torch's multi-paragraph refusal (which also suggests weights_only=False: no)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "global" in line:
            return line.rstrip(".") + "; the file holds more than tensors"
    return lines[0] if lines else "unreadable"


def _load_pickle(directory: Path, files: list[Path], config: Any, allow_pickle: bool, root: Path | None) -> Checkpoint:
    """Pickle weights are an opt-in, and even then only tensors are unpickled (`weights_only=True`)."""
    shown = files[0]
    if not allow_pickle:
        raise GrowkitError(
            f"{shown}: pickle checkpoint refused (pickles can run code); convert it to safetensors, "
            "or pass --allow-pickle to load it with torch.load(weights_only=True)"
        )
    if shown.name.endswith(".index.json"):
        weight_map = _read_json(shown).get("weight_map", {})
        files = [directory / f for f in dict.fromkeys(weight_map.values())]
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            loaded = _torch_load(file)
        except Exception as exc:  # torch raises many types for a bad pickle; all mean the same to the user
            raise GrowkitError(f"{file}: cannot load pickle weights safely ({type(exc).__name__}: "
                               f"{_pickle_reason(exc)})") from None
        if not isinstance(loaded, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                   for k, v in loaded.items()):
            raise GrowkitError(f"{file}: expected a state dict (names -> tensors), got {type(loaded).__name__}")
        state.update(loaded)
    ckpt = StateDictCheckpoint(state, _directory_config(directory, config), source=str(root or shown))
    ckpt.root = root or directory
    return ckpt
