"""Text or JSONL files -> one token stream on disk -> fixed-length blocks, read lazily (np.memmap).

Why on disk: large corpora must not sit in memory, and every process of a multi-process run must see the same
blocks. The main process tokenizes once into `<cache_dir>/<key>.bin` (uint16 when the vocab fits, else uint32);
the key hashes the tokenizer, the files (path, size, mtime) and the options, so a resumed run reuses it. Files are
read in ~1 MB chunks cut at line boundaries; every document (a text file, or one JSONL record) ends with EOS.

Block order is a pure function of (seed, position in the global stream): `BlockSampler` walks seeded per-epoch
permutations, so the data position is just a counter, resume is exact, and ranks take disjoint slices.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from growkit.errors import GrowkitError

TEXT_SUFFIXES = (".txt", ".text", ".md", ".py", ".rst", ".csv", ".tsv", ".html", ".xml", ".c", ".h", ".js")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
CHUNK_CHARS = 1 << 20


def resolve_data_paths(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand directories (sorted, recursive; text/JSONL suffixes) and check every file exists and is non-empty."""
    if not paths:
        raise GrowkitError("no data given: pass at least one --data PATH")
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise GrowkitError(f"data path {p} does not exist")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES)
            if not found:
                raise GrowkitError(f"data directory {p} holds no text or JSONL files")
            files.extend(found)
        else:
            files.append(p)
    for f in files:
        if f.stat().st_size == 0:
            raise GrowkitError(f"data file {f} is empty")
    return files


def not_text(path: Path, byte: int, what: str = "data file") -> GrowkitError:
    """The one message for a file that should be text and is not (binary, or another encoding)."""
    return GrowkitError(f"{what} {path} is not UTF-8 text (byte {byte})")


def check_calibration_files(paths: Iterable[str | Path]) -> None:
    """Calibration text (subclone's ranking, inspect's activations) must exist and be UTF-8, like training data."""
    for path in paths:
        if not Path(path).is_file():
            raise GrowkitError(f"{path}: calibration file not found")
        check_text_file(Path(path), "calibration file")


def check_text_file(path: Path, what: str = "data file") -> None:
    """Refuse a file that is not UTF-8 text, with the message training gives for it (for inputs read whole, such as
    calibration text, which would otherwise be decoded with replacement characters)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK_CHARS):
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as exc:
                    raise not_text(path, offset + exc.start, what) from None
                offset += len(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        raise not_text(path, offset + exc.start, what) from None
    except OSError as exc:
        raise GrowkitError(f"{what} {path}: cannot be read ({exc.strerror or exc})") from None


def _is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in JSONL_SUFFIXES


def iter_documents(path: Path, text_field: str = "text") -> Iterator[tuple[str, bool]]:
    """Yield (text piece, ends_document) pairs; pieces of a plain-text file are ~1 MB, cut after a newline."""
    if _is_jsonl(path):
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise GrowkitError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                text = rec if isinstance(rec, str) else rec.get(text_field) if isinstance(rec, dict) else None
                if not isinstance(text, str):
                    raise GrowkitError(f"{path}:{lineno}: record has no string field '{text_field}'")
                yield text, True
        return
    try:
        with open(path, encoding="utf-8") as fh:
            carry = ""
            while True:
                chunk = fh.read(CHUNK_CHARS)
                if not chunk:
                    break
                buf = carry + chunk
                # Cut after the last newline that is followed by a non-space, so BPE whitespace merges stay intact.
                cut = -1
                pos = len(buf) - 1
                while True:
                    pos = buf.rfind("\n", 0, pos)
                    if pos < 0 or pos + 1 >= len(buf):
                        break
                    if not buf[pos + 1].isspace():
                        cut = pos + 1
                        break
                if cut <= 0:
                    if len(buf) < 16 * CHUNK_CHARS:
                        carry = buf
                        continue
                    cut = len(buf)  # a pathological 16 MB line: cut anyway rather than grow without bound
                yield buf[:cut], False
                carry = buf[cut:]
            yield carry, True
    except UnicodeDecodeError as exc:
        raise not_text(path, exc.start) from None


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()


def cache_key(files: Sequence[Path], tokenizer, text_field: str = "text") -> str:
    """Hash of tokenizer + files (resolved path, size, mtime) + options: same inputs, same cache file."""
    h = hashlib.sha1(_tokenizer_fingerprint(tokenizer).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    h.update(f"field={text_field}|v1".encode())
    return h.hexdigest()[:16]


def _dtype_for(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def tokenize_files(files: Sequence[Path], tokenizer, out_path: Path, text_field: str = "text",
                   batch_chars: int = 4 * CHUNK_CHARS) -> int:
    """Tokenize files into `out_path` (raw ids), streaming; returns the token count.

    Atomic: the ids and their `.json` description are written under temporary names and renamed ids first, so the
    `.json`, which `load_blocks` looks for, only exists beside complete ids; temporaries go on any failure.
    """
    out_path.parent.mkdir(parents=True, exist_ok=True)
    temporaries = [out_path.with_name(f".{out_path.stem}-{os.getpid()}{suffix}.tmp") for suffix in (".bin", ".json")]
    try:
        total = _tokenize_into(files, tokenizer, *temporaries, text_field, batch_chars)
        os.replace(temporaries[0], out_path)
        os.replace(temporaries[1], out_path.with_suffix(".json"))
    except BaseException:
        for tmp in temporaries:
            tmp.unlink(missing_ok=True)
        raise
    return total


def _tokenize_into(files: Sequence[Path], tokenizer, tmp: Path, meta: Path, text_field: str, batch_chars: int) -> int:
    dtype = _dtype_for(len(tokenizer))
    eos = tokenizer.eos_token_id
    total = 0
    with open(tmp, "wb") as out:
        pending: list[tuple[str, bool]] = []
        pending_chars = 0

        def flush() -> int:
            if not pending:
                return 0
            encs = tokenizer([t for t, _ in pending], add_special_tokens=False, verbose=False)["input_ids"]
            ids: list[int] = []
            for enc, (_, ends) in zip(encs, pending):
                ids.extend(enc)
                if ends and eos is not None:
                    ids.append(eos)
            np.asarray(ids, dtype=dtype).tofile(out)
            pending.clear()
            return len(ids)

        for f in files:
            for piece, ends in iter_documents(f, text_field):
                pending.append((piece, ends))
                pending_chars += len(piece)
                if pending_chars >= batch_chars:
                    total += flush()
                    pending_chars = 0
        total += flush()
    meta.write_text(json.dumps({"tokens": total, "dtype": np.dtype(dtype).name, "files": [str(f) for f in files]},
                               indent=1))
    return total


class TokenBlocks:
    """Fixed-length blocks over a 1-D token array (memmap or in memory); block i is tokens[i*T:(i+1)*T]."""

    def __init__(self, tokens: np.ndarray, seq_len: int, source: str = "tokens") -> None:
        if seq_len < 2:
            raise GrowkitError(f"sequence length {seq_len} is too short (need at least 2)")
        self.tokens = tokens
        self.seq_len = seq_len
        self.source = source
        self.n_blocks = len(tokens) // seq_len
        if self.n_blocks == 0:
            raise GrowkitError(f"{source} gives {len(tokens)} tokens, fewer than one block of {seq_len}")

    def __len__(self) -> int:
        return self.n_blocks

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        """A [len(indices), T] LongTensor of the given blocks."""
        T = self.seq_len
        rows = [np.asarray(self.tokens[i * T:(i + 1) * T], dtype=np.int64) for i in indices]
        return torch.from_numpy(np.stack(rows)) if rows else torch.empty(0, T, dtype=torch.long)

    @classmethod
    def from_ids(cls, ids: Sequence[int] | np.ndarray | torch.Tensor, seq_len: int, source: str = "tokens") -> "TokenBlocks":
        arr = ids.numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
        return cls(arr.astype(np.int64, copy=False), seq_len, source)

    @classmethod
    def from_texts(cls, texts: Sequence[str], tokenizer, seq_len: int) -> "TokenBlocks":
        """In-memory blocks from strings (each one a document ending in EOS): for tests and benchmarks."""
        ids: list[int] = []
        for enc in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]:
            ids.extend(enc)
            if tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
        return cls.from_ids(ids, seq_len, "texts")


def load_blocks(paths: Sequence[str | os.PathLike], tokenizer, seq_len: int, cache_dir: Path,
                accelerator=None, text_field: str = "text") -> TokenBlocks:
    """Tokenize (main process only, cached) and memory-map the files as blocks of `seq_len` tokens."""
    files = resolve_data_paths(paths)
    key = cache_key(files, tokenizer, text_field)
    bin_path = Path(cache_dir) / f"{key}.bin"
    is_main = accelerator is None or accelerator.is_main_process
    if is_main and not (bin_path.exists() and bin_path.with_suffix(".json").exists()):
        tokenize_files(files, tokenizer, bin_path, text_field)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    meta = json.loads(bin_path.with_suffix(".json").read_text())
    label = files[0].name if len(files) == 1 else f"{len(files)} data files"
    if meta["tokens"] == 0:
        raise GrowkitError(f"{label} holds no tokens")
    tokens = np.memmap(bin_path, dtype=np.dtype(meta["dtype"]), mode="r", shape=(meta["tokens"],))
    return TokenBlocks(tokens, seq_len, label)


class BlockSampler:
    """Global block order: position g of the stream is block perm_e[g mod N] with e = g // N (seeded per epoch).

    A step of a run with P processes, K accumulation micro-steps and micro-batch B consumes P*K*B positions; the
    micro-batch of (step, micro, rank) is positions ((step*K + micro)*P + rank)*B ... +B. So the union over ranks
    is the same as one process with batch P*B, and the position to resume from is a function of the step only.
    """

    def __init__(self, n_blocks: int, seed: int) -> None:
        self.n = n_blocks
        self.seed = seed
        self._epoch = -1
        self._perm: np.ndarray | None = None

    def _perm_for(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.n, generator=g).numpy()
            self._epoch = epoch
        return self._perm  # type: ignore[return-value]

    def positions(self, start: int, count: int) -> list[int]:
        """Block indices at global stream positions [start, start + count)."""
        out = []
        for g in range(start, start + count):
            out.append(int(self._perm_for(g // self.n)[g % self.n]))
        return out

    def micro_batch(self, step: int, micro: int, rank: int, world: int, accum: int, batch: int) -> list[int]:
        return self.positions(((step * accum + micro) * world + rank) * batch, batch)

    def epoch_at(self, step: int, world: int, accum: int, batch: int) -> float:
        return step * world * accum * batch / self.n
