"""The bad-input matrix, through the real CLI in subprocesses: every case exits non-zero with one `error:` line that
names the file and the problem, prints no traceback, and writes nothing at the output path (nor leaves a temporary
directory beside it). docs/errors.md lists the same cases with the message each gives.

The cases are prepared first, then their CLI runs go in one batch (`cli_util.run_cli_batch`: each is its own
process running the CLI's `main()` with its own argv, forked from one interpreter that imported growkit once), then
each case is checked by its own test. The disk-full and signal cases run `python -m growkit.cli` in full.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_util import (assert_nothing_written, error_line, read_safetensors, run_cli_batch, snapshot,
                      write_safetensors)
from conftest import save_tiny
from growkit.checkpoint.reader import load_checkpoint
from growkit.pipeline import plan_growth


@dataclass
class Case:
    """One bad input: the CLI arguments, the output path that must stay untouched, and what the message names."""

    args: list[str]
    out: Path
    names: list[str]  # fragments the one-line message must contain: the file, and words for the problem
    before: dict[str, bytes] | None = None  # an existing output that must stay byte-identical
    result: subprocess.CompletedProcess[str] | None = field(default=None, repr=False)
    skip: str | None = None


def _copy(src: Path, root: Path, name: str) -> Path:
    dst = root / name
    shutil.copytree(src, dst)
    return dst


def _copy_with_config(src: Path, root: Path, name: str, **changes: object) -> Path:
    """A copy of checkpoint `src` whose config.json has `changes` applied."""
    dst = _copy(src, root, name)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _edit_header(path: Path, edit: Callable[[dict], None]) -> None:
    header, data = read_safetensors(path)
    edit(header)
    write_safetensors(path, header, data)


def _rewrite_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


# --- the cases ----------------------------------------------------------------------------------------------------

def truncated_safetensors(root: Path, gpt2: Path, llama: Path) -> Case:
    src = _copy(gpt2, root, "truncated")
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size * 2 // 3])
    return Case(["grow", src, "-o", root / "out-truncated", "--width", "2x"], root / "out-truncated",
                [weights, "not a valid safetensors file"])


def corrupt_header_json(root: Path, gpt2: Path, llama: Path) -> Case:
    src = _copy(gpt2, root, "corrupt-header")
    weights = src / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[9:11] = b",,"  # right after the header's opening brace: no longer JSON
    weights.write_bytes(bytes(raw))
    return Case(["grow", src, "-o", root / "out-corrupt", "--width", "2x"], root / "out-corrupt",
                [weights, "not a valid safetensors file"])


def header_offsets_out_of_range(root: Path, gpt2: Path, llama: Path) -> Case:
    src = _copy(gpt2, root, "offsets")
    weights = src / "model.safetensors"

    def edit(header: dict) -> None:
        name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
        header[name]["data_offsets"][1] += 1 << 20  # ends a MiB past the end of the file

    _edit_header(weights, edit)
    return Case(["grow", src, "-o", root / "out-offsets", "--width", "2x"], root / "out-offsets",
                [weights, "not a valid safetensors file"])


def dtype_mismatch(root: Path, gpt2: Path, llama: Path) -> Case:
    src = _copy(gpt2, root, "int-weight")
    name = "transformer.h.0.mlp.c_fc.weight"
    _rewrite_tensors(src / "model.safetensors", lambda t: t.update({name: (t[name] * 100).to(torch.int32)}))
    return Case(["grow", src, "-o", root / "out-int", "--width", "2x"], root / "out-int",
                [src, name, "non-float dtype torch.int32"])


def shape_mismatch(root: Path, gpt2: Path, llama: Path) -> Case:
    src = _copy(gpt2, root, "transposed")
    name = "transformer.h.1.mlp.c_fc.weight"
    _rewrite_tensors(src / "model.safetensors", lambda t: t.update({name: t[name].t().contiguous()}))
    return Case(["grow", src, "-o", root / "out-transposed", "--width", "2x"], root / "out-transposed",
                [src, name, "has shape [128, 32], but the config implies [32, 128]"])


def missing_config(root: Path, gpt2: Path, llama: Path) -> Case:
    src = _copy(gpt2, root, "no-config")
    (src / "config.json").unlink()
    return Case(["grow", src, "-o", root / "out-no-config", "--width", "2x"], root / "out-no-config",
                [src, "no config.json"])


def config_not_inferable(root: Path, gpt2: Path, llama: Path) -> Case:
    bare = root / "unknown-names.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(4, 4), "pooler.weight": torch.zeros(4)}, bare)
    return Case(["grow", bare, "-o", root / "out-unknown-names", "--width", "2x"], root / "out-unknown-names",
                [bare, "match no supported architecture", "--config"])


def config_inference_incomplete(root: Path, gpt2: Path, llama: Path) -> Case:
    tensors = load_file(llama / "model.safetensors")
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    bare = root / "half-llama.safetensors"
    save_file(tensors, bare)
    return Case(["grow", bare, "-o", root / "out-half-llama", "--width", "2x"], root / "out-half-llama",
                [bare, "cannot infer a llama config", "model.layers.0.self_attn.k_proj.weight"])


def config_tensor_size_disagreement(root: Path, gpt2: Path, llama: Path) -> Case:
    src = _copy_with_config(gpt2, root, "config-hidden", n_embd=48)  # the tensors are 32 wide
    return Case(["grow", src, "-o", root / "out-config-hidden", "--width", "2x"], root / "out-config-hidden",
                [src, "transformer.wte.weight has shape [101, 32], but the config implies [101, 48]"])


def config_layer_disagreement(root: Path, gpt2: Path, llama: Path) -> Case:
    src = _copy_with_config(gpt2, root, "config-layers", n_layer=1)  # the file has two layers
    return Case(["grow", src, "-o", root / "out-config-layers", "--width", "2x"], root / "out-config-layers",
                [src, "unexpected tensor transformer.h.1."])


def malformed_config_field(root: Path, gpt2: Path, llama: Path) -> Case:
    src = _copy_with_config(gpt2, root, "config-string", n_head="four")
    return Case(["grow", src, "-o", root / "out-config-string", "--width", "2x"], root / "out-config-string",
                [src, 'config: n_head is "four"; it must be a whole number'])


def unknown_model_type(root: Path, gpt2: Path, llama: Path) -> Case:
    src = _copy_with_config(gpt2, root, "bert", model_type="bert")
    return Case(["grow", src, "-o", root / "out-bert", "--width", "2x"], root / "out-bert",
                [src, "unsupported model_type 'bert'; supported: ", " gpt2, ", " llama, "])


def pickle_only(root: Path, gpt2: Path, llama: Path) -> Case:
    src = root / "pickled"
    src.mkdir()
    shutil.copy(gpt2 / "config.json", src / "config.json")
    torch.save(load_file(gpt2 / "model.safetensors"), src / "pytorch_model.bin")
    return Case(["grow", src, "-o", root / "out-pickled", "--width", "2x"], root / "out-pickled",
                [src / "pytorch_model.bin", "pickle checkpoint refused", "--allow-pickle"])


def malicious_pickle_even_with_opt_in(root: Path, gpt2: Path, llama: Path) -> Case:
    src = root / "evil"
    src.mkdir()
    shutil.copy(gpt2 / "config.json", src / "config.json")
    marker = root / "evil-ran"
    torch.save(_Evil(str(marker)), src / "pytorch_model.bin")
    return Case(["grow", src, "-o", root / "out-evil", "--width", "2x", "--allow-pickle"], root / "out-evil",
                [src / "pytorch_model.bin", "cannot load pickle weights safely", "UnpicklingError",
                 "unsupported GLOBAL posix.system"])


class _Evil:
    """A pickle whose loading would run a shell command: `weights_only=True` must refuse to build it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: D105
        return (os.system, (f"touch {self.marker}",))


NAN_TENSOR = "model.layers.1.mlp.down_proj.weight"


def _poison(t: dict[str, torch.Tensor]) -> None:
    t[NAN_TENSOR][3, 5] = float("nan")
    t[NAN_TENSOR][0, 0] = float("inf")


def nonfinite_weights(root: Path, gpt2: Path, llama: Path) -> Case:
    src = _copy(llama, root, "nan")
    _rewrite_tensors(src / "model.safetensors", _poison)
    return Case(["grow", src, "-o", root / "out-nan", "--width", "2x"], root / "out-nan",
                [src, NAN_TENSOR, "contains NaN or Inf", "--allow-nonfinite"])


def heads_not_divisible(root: Path, gpt2: Path, llama: Path) -> Case:
    return Case(["grow", gpt2, "-o", root / "out-heads", "--hidden", "64", "--heads", "6"], root / "out-heads",
                [gpt2, "would not load: n_embd 64 is not divisible by n_head 6", "`--heads 8`"])


def gqa_groups(root: Path, gpt2: Path, llama: Path) -> Case:
    return Case(["grow", llama, "-o", root / "out-gqa", "--heads", "6", "--kv-heads", "4"], root / "out-gqa",
                [llama, "heads 6 must be a multiple of kv heads 4"])


def clone_non_integer_ratio(root: Path, gpt2: Path, llama: Path) -> Case:
    return Case(["grow", llama, "-o", root / "out-ratio", "--hidden", "48"], root / "out-ratio",
                [llama, "--method clone needs integer ratios", "hidden 32 -> 48", "net2net"])


def tensor_missing(root: Path, gpt2: Path, llama: Path) -> Case:
    src = _copy(llama, root, "missing-tensor")
    name = "model.layers.1.post_attention_layernorm.weight"
    _rewrite_tensors(src / "model.safetensors", lambda t: t.pop(name))
    return Case(["grow", src, "-o", root / "out-missing", "--width", "2x"], root / "out-missing",
                [src, f"tensor {name} is missing"])


def output_inside_source(root: Path, gpt2: Path, llama: Path) -> Case:
    src = _copy(gpt2, root, "inside")
    return Case(["grow", src, "-o", src / "grown", "--width", "2x"], src / "grown",
                [src / "grown", f"output is inside the input {src}"])


def output_exists(root: Path, gpt2: Path, llama: Path) -> Case:
    out = root / "out-exists"
    out.mkdir()
    (out / "keep.txt").write_text("the user's file\n")
    return Case(["grow", gpt2, "-o", out, "--width", "2x"], out, [out, "already exists", "--overwrite"],
                before=snapshot(out))


CASES = [truncated_safetensors, corrupt_header_json, header_offsets_out_of_range, dtype_mismatch, shape_mismatch,
         missing_config, config_not_inferable, config_inference_incomplete, config_tensor_size_disagreement,
         config_layer_disagreement, malformed_config_field, unknown_model_type, pickle_only,
         malicious_pickle_even_with_opt_in, nonfinite_weights, heads_not_divisible, gqa_groups,
         clone_non_integer_ratio, tensor_missing, output_inside_source, output_exists]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-input-src")
    gpt2, llama = save_tiny("gpt2", root / "gpt2"), save_tiny("llama-gqa4", root / "llama")
    pickled = root / "pickled"
    pickled.mkdir()
    shutil.copy(gpt2 / "config.json", pickled / "config.json")
    torch.save(load_file(gpt2 / "model.safetensors"), pickled / "pytorch_model.bin")
    nan = _copy(llama, root, "nan")
    _rewrite_tensors(nan / "model.safetensors", _poison)
    return {"gpt2": gpt2, "llama": llama, "pickled": pickled, "nan": nan}


def unwritable_output_dir(root: Path, gpt2: Path, llama: Path) -> Case:
    locked = root / "read-only"
    locked.mkdir()
    how = make_read_only(locked)
    case = Case(["grow", gpt2, "-o", locked / "out", "--width", "2x"], locked / "out", [locked, "not writable"])
    case.skip = None if how else "cannot make a read-only directory here (root without mount rights)"
    return case


CASES.append(unwritable_output_dir)


def unknown_sampling(root: Path, gpt2: Path, llama: Path) -> Case:
    return Case(["grow", llama, "-o", root / "out-sampling", "--width", "2x", "--method", "rc-sample", "--sampling",
                 "sobol"], root / "out-sampling", [llama, "unknown sampling 'sobol'", "iid, stratified"])


CASES.append(unknown_sampling)

# Runs that must succeed, done in the same concurrent batch (checked by the opt-in tests below).
OPT_INS = {
    "allow_pickle": lambda root, src: ["grow", src["pickled"], "-o", root / "ok-pickle", "--width", "2x",
                                       "--allow-pickle"],
    "same_from_safetensors": lambda root, src: ["grow", src["gpt2"], "-o", root / "ok-st", "--width", "2x"],
    "allow_nonfinite": lambda root, src: ["grow", src["nan"], "-o", root / "ok-nan", "--width", "2x",
                                          "--allow-nonfinite"],
}


def make_read_only(path: Path) -> str | None:
    """A directory nobody may write to: a read-only tmpfs mounted on it (as root, for whom permission bits do not
    count), or mode 0555 (as anyone else). Returns how, or None."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        return "chmod 0555"
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)], capture_output=True)
    return "read-only tmpfs" if proc.returncode == 0 else None


def release(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["umount", str(path)], capture_output=True)
    else:
        path.chmod(0o755)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, sources) -> dict[str, Case]:
    root = tmp_path_factory.mktemp("bad-input")
    cases = {make.__name__: make(root, sources["gpt2"], sources["llama"]) for make in CASES}
    jobs: dict[str, list] = {name: c.args for name, c in cases.items() if not c.skip}
    jobs.update({name: make(root, sources) for name, make in OPT_INS.items()})

    try:
        results = dict(zip(jobs, run_cli_batch([[*args, "--quiet"] for args in jobs.values()])))
    finally:
        release(root / "read-only")
    for name, case in cases.items():
        case.result = results.get(name)
    cases.update({name: Case(args, Path(args[3]), [], result=results[name]) for name, args in jobs.items()
                  if name in OPT_INS})
    return cases


@pytest.mark.parametrize("name", [make.__name__ for make in CASES])
def test_bad_input_gives_one_line_and_writes_nothing(matrix, name):
    case = matrix[name]
    if case.skip:
        pytest.skip(case.skip)
    assert case.result is not None
    error_line(case.result.returncode, case.result.stderr, *case.names)
    assert case.result.returncode == 2
    assert_nothing_written(case.out, case.before)
    if name == "malicious_pickle_even_with_opt_in":
        assert not (case.out.parent / "evil-ran").exists(), "the pickle ran code"


# --- the opt-ins: the same inputs, accepted when the user says so ---------------------------------------------------

def test_allow_pickle_loads_weights_only_and_matches_safetensors(matrix):
    for name in ("allow_pickle", "same_from_safetensors"):
        assert matrix[name].result.returncode == 0, matrix[name].result.stderr
    a = load_file(matrix["allow_pickle"].out / "model.safetensors")
    b = load_file(matrix["same_from_safetensors"].out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_allow_nonfinite_grows_and_keeps_the_nan_where_it_was(matrix):
    run = matrix["allow_nonfinite"]
    assert run.result.returncode == 0, run.result.stderr
    grown = load_file(run.out / "model.safetensors")[NAN_TENSOR]  # [hidden 64, ffn 96]: clone tiles in blocks
    assert {tuple(i) for i in torch.isnan(grown).nonzero().tolist()} == {(3, 5), (35, 5), (3, 53), (35, 53)}
    assert {tuple(i) for i in torch.isinf(grown).nonzero().tolist()} == {(0, 0), (32, 0), (0, 48), (32, 48)}


# --- the file system gives out mid-write ---------------------------------------------------------------------------

def _limit_file_size() -> None:
    import resource
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (128 * 1024, 128 * 1024))


def test_disk_full_during_write(tmp_path, sources):
    """A real tmpfs (as root) just large enough for the weights' bytes, which growkit checks before writing, but not
    for the shard header and the other files; elsewhere a real 128 KiB file-size limit (RLIMIT_FSIZE). Either way
    the write fails after the temporary directory exists (the 2x output is ~440 KB)."""
    small = tmp_path / "small-fs"
    small.mkdir()
    growth = plan_growth(load_checkpoint(sources["gpt2"]), width="2x")
    # the weights' pages, and one for the writer's marker file in its temporary directory
    pages = -(-sum(e.nbytes for e, _, _ in growth.entries(torch.float32)) // 4096) + 1
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={pages * 4096}", "tmpfs", str(small)], capture_output=True
    ).returncode == 0
    out = small / "out"
    try:
        from cli_util import cli_command, cli_env

        proc = subprocess.run(cli_command("grow", sources["gpt2"], "-o", out, "--width", "2x", "--quiet"),
                              capture_output=True, text=True, env=cli_env(), timeout=120,
                              preexec_fn=None if mounted else _limit_file_size)
        why = "disk full (no space left on device)" if mounted else "file too large"
        error_line(proc.returncode, proc.stderr, out, why, "while writing", "nothing was written")
        assert proc.returncode == 2
        assert_nothing_written(out)
        if mounted:
            assert shutil.disk_usage(small).used < 64 * 1024  # the partial shard is gone, not just hidden
    finally:
        if mounted:
            subprocess.run(["umount", str(small)], capture_output=True)
