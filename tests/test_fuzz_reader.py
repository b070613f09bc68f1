"""Fuzzing the reading path (safetensors bytes, header JSON, metadata config, config.json) with hypothesis, for a
bounded number of examples (GROWKIT_FUZZ_EXAMPLES, default 120 per target, a few seconds; set it high for a long
offline run): whatever the mutation, reading, planning and growing either works and returns exactly the bytes the
header describes, or raises GrowkitError with a one-line message naming the file; never another exception type.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import save_tiny
from growkit.checkpoint.reader import load_checkpoint
from growkit.errors import GrowkitError
from growkit.pipeline import grown_tensors, plan_growth

FUZZ = settings(max_examples=int(os.environ.get("GROWKIT_FUZZ_EXAMPLES", "120")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

_BASE: dict[str, object] = {}


def base() -> dict[str, object]:
    """A tiny GPT-2 as one bare .safetensors file with its config in the metadata, and the same as a directory."""
    if not _BASE:
        root = Path(tempfile.mkdtemp(prefix="growkit-fuzz-"))
        src = save_tiny("gpt2", root / "gpt2")
        config = json.loads((src / "config.json").read_text())
        ckpt = load_checkpoint(src)
        from safetensors.torch import save_file

        save_file({n: ckpt.get(n) for n in ckpt.names()}, root / "bare.safetensors",
                  metadata={"format": "pt", "config": json.dumps(config)})
        raw = (root / "bare.safetensors").read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        _BASE.update(root=root, dir=src, config=config, raw=raw, header=json.loads(raw[8:8 + n]), data=raw[8 + n:])
    return _BASE


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def oracle(raw: bytes) -> dict[str, torch.Tensor]:
    """An independent reading of the format (length, JSON header, offsets into the data section)."""
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        buf = bytearray(data[b:e])
        t = torch.frombuffer(buf, dtype=_DTYPES[info["dtype"]]) if buf else torch.empty(0, dtype=_DTYPES[info["dtype"]])
        out[name] = t.reshape(info["shape"]).to(torch.float32)
    return out


def read_and_grow(path: Path) -> dict[str, torch.Tensor] | None:
    """Everything a grow does before writing: open, read every tensor, plan, compute every output tensor."""
    try:
        ckpt = load_checkpoint(path)
        tensors = {n: ckpt.get(n) for n in ckpt.names()}
        growth = plan_growth(ckpt, width="2x")
        for _ in grown_tensors(growth, torch.float32, allow_nonfinite=True):
            pass
        return tensors
    except GrowkitError as exc:
        message = str(exc)
        assert message and "\n" not in message, repr(message)
        assert str(path) in message, f"the message does not name {path}: {message}"
        return None


def check_file(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.safetensors"
        path.write_bytes(raw)
        read = read_and_grow(path)
        if read is not None:
            expected = oracle(raw)
            assert read.keys() == expected.keys()
            for name, t in read.items():
                assert torch.equal(t.nan_to_num(7.0), expected[name].nan_to_num(7.0)), name


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8)
small_ints = st.integers(-2, 300)
header_values = (json_values | st.sampled_from(list(_DTYPES) + ["F8_E4M3", "U16", "U64", "C64"])
                 | st.lists(small_ints, max_size=4) | st.tuples(st.integers(-10, 70000), st.integers(-10, 70000)).map(list))


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.none() | st.integers(0, 100_000))
def test_mutated_bytes(edits, cut):
    raw = bytearray(base()["raw"])
    for pos, value in edits:  # most positions land in the 8-byte length and the JSON header
        raw[pos % len(raw)] = value
    check_file(bytes(raw[:cut] if cut is not None else raw))


@FUZZ
@given(data=st.data())
def test_mutated_header(data):
    b = base()
    header = json.loads(json.dumps(b["header"]))
    names = sorted(k for k in header if k != "__metadata__")
    for _ in range(data.draw(st.integers(1, 3))):
        kind = data.draw(st.sampled_from(["field", "drop-field", "drop-tensor", "metadata", "length"]))
        name = data.draw(st.sampled_from(names))
        if kind == "field" and name in header:
            header[name][data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))] = data.draw(header_values)
        elif kind == "drop-field" and name in header:
            header[name].pop(data.draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        elif kind == "drop-tensor":
            header.pop(name, None)
        elif kind == "metadata":
            header["__metadata__"] = data.draw(st.dictionaries(st.sampled_from(["config", "format", "x"]),
                                                               st.text(max_size=20) | st.just("{}") | st.just("[1]")))
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    length = data.draw(st.none() | st.integers(0, 2**64 - 1)) if kind == "length" else None
    raw = struct.pack("<Q", len(hb) if length is None else length) + hb + b["data"]
    check_file(raw)


SIZE_KEYS = ["n_embd", "n_head", "n_layer", "n_inner", "vocab_size", "n_positions", "model_type",
             "tie_word_embeddings", "layer_norm_epsilon", "scale_attn_by_inverse_layer_idx"]
edge_values = st.sampled_from([0, -1, 1, 2, 3, 7, 31, 33, 64, 128, 2**31, 2**63, 10**30, 1.5, 32.0, float("nan"),
                               float("inf"), "32", "x", None, True, False, [], {}, [32], "llama", "qwen3", "gpt2"])


@FUZZ
@given(data=st.data())
def test_mutated_config(data):
    b = base()
    config = dict(b["config"])
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(SIZE_KEYS) | st.sampled_from(sorted(config)) | st.text(max_size=8))
        if data.draw(st.integers(0, 3)) == 0:
            config.pop(key, None)
        else:
            config[key] = data.draw(edge_values | small_ints | json_values)
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "ckpt"
        src.mkdir()
        shutil.copy(Path(b["dir"]) / "model.safetensors", src / "model.safetensors")
        (src / "config.json").write_text(json.dumps(config))
        read_and_grow(src)


@pytest.fixture(scope="module", autouse=True)
def _cleanup():
    yield
    if _BASE:
        shutil.rmtree(_BASE["root"], ignore_errors=True)


def test_every_size_field_with_every_edge_value():
    """The systematic corner of the config fuzz: each field the plan reads, set to each awkward value."""
    b = base()
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "ckpt"
        src.mkdir()
        shutil.copy(Path(b["dir"]) / "model.safetensors", src / "model.safetensors")
        for key in SIZE_KEYS:
            for value in [0, -1, 1, 3, 2**63, 1.5, float("nan"), "x", None, [], True, "__delete__"]:
                config = dict(b["config"])
                if value == "__delete__":
                    config.pop(key, None)
                else:
                    config[key] = value
                (src / "config.json").write_text(json.dumps(config))
                read_and_grow(src)
