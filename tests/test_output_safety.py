"""No command may touch its inputs or an unrelated directory: outputs that equal, lie inside or contain an input
(or the working directory) are refused, --overwrite replaces only checkpoints, and odd output paths (symbolic links,
a file as parent, very long names) get one line instead of a mess (issue 11, items 1, 2, 3, 15, 16)."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

import growkit
from cli_helper import run_cli as run_cli_in
from cli_util import error_line, run_cli, run_cli_batch
from hub_fixtures import hub, hub_env, tiny_gpt2  # noqa: F401 (fixtures)
from growkit.errors import GrowkitError
from growkit.hub.push import push
from growkit.recipe import run_recipe
from localhub import TOKEN

TRAIN = ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "-q"]


def tree(root: Path) -> dict[str, bytes | str]:
    """Every file (its bytes), directory and symbolic link under `root`: what "nothing changed" compares."""
    found: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        key = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[key] = f"link -> {os.readlink(path)}"
        elif path.is_dir():
            found[key] = "dir"
        else:
            found[key] = path.read_bytes()
    return found


@pytest.fixture
def world(tmp_path, tiny_gpt2) -> dict[str, Path]:
    """P/src (a checkpoint with tokenizer), P/data.txt beside it, docs/ (someone's files, one named config.json),
    d/model.safetensors (a bare file with its config) and a recipe that grows P/src."""
    root = tmp_path / "world"
    p = root / "P"
    src = p / "src"
    shutil.copytree(tiny_gpt2, src)
    data = p / "data.txt"
    data.write_text("def f(x):\n    return x + 1\n" * 400)
    docs = root / "docs"
    docs.mkdir()
    (docs / "config.json").write_text('{"mine": true}\n')
    (docs / "thesis.tex").write_text("\\documentclass{article}\n")
    bare = root / "d"
    bare.mkdir()
    shutil.copy(src / "model.safetensors", bare / "model.safetensors")
    shutil.copy(src / "config.json", bare / "config.json")
    recipe = root / "r.yaml"
    recipe.write_text(f"source: {src}\ngrow: {{width: 2}}\n")
    return {"root": root, "P": p, "src": src, "data": data, "docs": docs, "bare": bare, "recipe": recipe}


def test_no_command_touches_an_input_or_an_unrelated_directory(world, hub, hub_env):
    """Acceptance: every command, with an output equal to, inside, or containing an input, and with --overwrite
    onto a directory that is not a checkpoint, is refused in one line; every file under the test's root, inputs
    included, is byte-identical afterwards (so nothing outside the output changed either)."""
    w = world
    src, p, data, docs, bare, recipe = w["src"], w["P"], w["data"], w["docs"], w["bare"], w["recipe"]
    before = tree(w["root"])
    cases = {
        "grow: output is the source": ["grow", src, "--width", "2x", "-o", src, "--overwrite"],
        "grow: output inside the source": ["grow", src, "--width", "2x", "-o", src / "grown"],
        "grow: output contains the source": ["grow", src, "--width", "2x", "-o", p, "--overwrite"],
        "grow: output contains a bare source file": ["grow", bare / "model.safetensors", "--width", "2x", "-o",
                                                     bare, "--overwrite"],
        "grow: output contains the --config file": ["grow", bare / "model.safetensors", "--config",
                                                    bare / "config.json", "--width", "2x", "-o", bare / "config.json",
                                                    "--overwrite"],
        "grow: --overwrite onto someone's directory": ["grow", src, "--width", "2x", "-o", docs, "--overwrite"],
        "shrink: output is the source": ["shrink", src, "--width", "0.5x", "-o", src, "--overwrite"],
        "shrink: output inside the source": ["shrink", src, "--width", "0.5x", "-o", src / "small"],
        "shrink: output contains the calibration text": ["shrink", src, "--width", "0.5x", "--calibration", data,
                                                         "-o", p, "--overwrite"],
        "shrink: --overwrite onto someone's directory": ["shrink", src, "--width", "0.5x", "-o", docs, "--overwrite"],
        "train: output is the checkpoint": ["train", src, "-d", data, "-o", src, *TRAIN],
        "train: output inside the checkpoint": ["train", src, "-d", data, "-o", src / "run", *TRAIN],
        "train: output contains the checkpoint and data": ["train", src, "-d", data, "-o", p, *TRAIN],
        "train: output is the data file": ["train", src, "-d", data, "-o", data, *TRAIN],
        "train: into someone's directory": ["train", src, "-d", data, "-o", docs, *TRAIN],
        "run: output is the source": ["run", recipe, "--out", src, "--overwrite", "-q"],
        "run: output inside the source": ["run", recipe, "--out", src / "grown", "-q"],
        "run: output contains the source and the recipe": ["run", recipe, "--out", w["root"], "--overwrite", "-q"],
        "run: --overwrite onto someone's directory": ["run", recipe, "--out", docs, "--overwrite", "-q"],
        "inspect: output is the checkpoint": ["inspect", src, "-o", src, "-q", "--permutations", "9"],
        "inspect: output inside the checkpoint": ["inspect", src, "-o", src / "report", "-q", "--permutations", "9"],
        "inspect: output contains the checkpoint": ["inspect", src, "-o", p, "-q", "--permutations", "9"],
    }
    results = run_cli_batch(list(cases.values()), width=2)
    accepted = [f"{name}: exit {proc.returncode}" for name, proc in zip(cases, results) if proc.returncode != 2]
    assert not accepted, accepted
    for proc in results:
        error_line(proc.returncode, proc.stderr)
    assert tree(w["root"]) == before

    # push writes nothing locally: the folder it uploads stays as it was.
    env = {"HF_TOKEN": TOKEN, "HF_HOME": str(hub_env / "hf_home"), "HF_HUB_DISABLE_XET": "1", "NO_PROXY": "127.0.0.1"}
    pushed = run_cli_in(["push", str(src), "--repo-id", "alice/src", "--endpoint", hub.endpoint], env)
    assert pushed.returncode == 0, pushed.stderr
    assert tree(w["root"]) == before


def test_output_that_is_or_contains_the_working_directory_is_refused(world, tmp_path, monkeypatch):
    """`-o "$PWD" --overwrite` from inside a directory that looks like a checkpoint: refused all the same."""
    here = tmp_path / "there" / "here"
    shutil.copytree(world["src"], here)
    monkeypatch.chdir(here)
    before = tree(tmp_path)
    for out, why in ((".", "output is the working directory"), ("..", "output contains the working directory")):
        with pytest.raises(GrowkitError, match=why):
            growkit.grow(world["src"], out, width="2x", quiet=True, overwrite=True)
    assert tree(tmp_path) == before


def test_overwrite_replaces_a_checkpoint_and_says_so(world, tmp_path, capsys):
    out = tmp_path / "grown"
    growkit.grow(world["src"], out, width="2x", quiet=True)
    growkit.grow(world["src"], out, width="2x", quiet=True, seed=1, overwrite=True)
    assert f"growkit: replaced the previous {out} (--overwrite)" in capsys.readouterr().err
    assert not list(tmp_path.glob(".growkit-tmp-*"))


def test_recipe_overwrite_keeps_the_previous_output_when_the_new_run_fails(world, tmp_path, monkeypatch):
    """The recipe used to delete its previous trained output before the new run had succeeded."""
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "t.yaml"
    recipe.write_text(f"source: {world['src']}\nout: trained\ngrow: {{width: 2, verify: false}}\n"
                      f"train: {{data: [{world['data']}], steps: 2, batch_size: 2, seq_len: 16, quiet: true}}\n")
    run_recipe(recipe, quiet=True)
    previous = tree(tmp_path / "trained")
    assert "model.safetensors" in previous
    recipe.write_text(recipe.read_text().replace("seq_len: 16", "seq_len: 4000"))  # fails once training starts
    with pytest.raises(GrowkitError, match="--seq-len 4000 exceeds"):
        run_recipe(recipe, quiet=True, overrides={"overwrite": True})
    assert tree(tmp_path / "trained") == previous
    assert not list(tmp_path.glob(".growkit-tmp-*"))


def test_odd_output_paths_get_one_line_and_leave_nothing(world, tmp_path):
    """Item 15: a symbolic link as output (with --overwrite, or dangling), a file as parent, a 250-character name,
    and a shard size without its unit."""
    src = world["src"]
    first = tmp_path / "real"
    assert run_cli("grow", src, "--width", "2x", "-o", first, "-q").returncode == 0
    link = tmp_path / "link"
    link.symlink_to(first)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    afile = tmp_path / "afile"
    afile.write_text("x")
    before = tree(tmp_path)
    long_name = tmp_path / ("n" * 250)
    cases = [
        (["grow", src, "--width", "2x", "-o", link, "--overwrite"], [link, "is a symbolic link"]),
        (["grow", src, "--width", "2x", "-o", dangling], [dangling, "is a symbolic link"]),
        (["grow", src, "--width", "2x", "-o", afile / "out"], [f"{afile} is a file, not a directory"]),
        (["grow", src, "--width", "2x", "-o", tmp_path / "s0", "--max-shard-size", "0"], ["--max-shard-size", "'0'"]),
        (["grow", src, "--width", "2x", "-o", tmp_path / "s1", "--max-shard-size", "1"], ["below the minimum"]),
        (["grow", src, "--width", "2x", "-o", long_name, "-q"], []),
    ]
    results = run_cli_batch([argv for argv, _ in cases], width=2)
    for (argv, fragments), proc in zip(cases[:-1], results[:-1]):
        error_line(proc.returncode, proc.stderr, *fragments)
    assert results[-1].returncode == 0, results[-1].stderr
    assert (long_name / "model.safetensors").is_file()
    shutil.rmtree(long_name)
    assert tree(tmp_path) == before
    assert link.resolve() == first.resolve()


def test_shrink_and_inspect_calibration_refuse_binary_like_train(world, tmp_path):
    binary = tmp_path / "blob.txt"
    binary.write_bytes(bytes(range(256)) * 8)
    out = tmp_path / "small"
    with pytest.raises(GrowkitError, match=rf"calibration file {binary} is not UTF-8 text \(byte 128\)"):
        growkit.shrink(world["src"], out, width="0.5x", calibration=binary)
    with pytest.raises(GrowkitError, match=rf"calibration file {binary} is not UTF-8 text \(byte 128\)"):
        growkit.inspect(world["src"], calibration=[binary], plots=False)
    with pytest.raises(GrowkitError, match=rf"data file {binary} is not UTF-8 text \(byte 128\)"):
        growkit.train(world["src"], binary, tmp_path / "run", steps=2, batch_size=2, seq_len=16, quiet=True)
    assert not out.exists()


def test_training_output_is_0644_with_a_model_card(world, tmp_path):
    """Item 16: model.safetensors was written 0600 while the other files were 0644, and no README.md."""
    out = tmp_path / "run"
    growkit.train(world["src"], world["data"], out, steps=2, batch_size=2, seq_len=16, quiet=True)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md", "training.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    card = (out / "README.md").read_text()
    assert "trained from `src` with growkit" in card and "optimizer steps: 2" in card
    assert not list(out.glob(".final-model-*"))


# --- push: timeouts and credentials in the endpoint --------------------------------------------------------------

class SilentServer:
    """Accepts connections on 127.0.0.1 and never answers (the hang of issue 11, item 9). After `give_up_s` it
    hangs up, so a client without a timeout fails the test instead of hanging it."""

    def __init__(self, give_up_s: float = 60) -> None:
        self.give_up_s = give_up_s

    def __enter__(self) -> "SilentServer":
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()
        self.watchdog = threading.Timer(self.give_up_s, self.__exit__)
        self.watchdog.start()
        return self

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def __exit__(self, *exc: object) -> None:
        self.watchdog.cancel()
        self.sock.close()
        for conn in self.held:
            conn.close()


def test_push_to_an_endpoint_that_never_answers_times_out(world, hub_env, monkeypatch):
    monkeypatch.setenv("GROWKIT_PUSH_TIMEOUT", "1")
    with SilentServer() as server:
        endpoint = f"http://127.0.0.1:{server.port}"
        start = time.monotonic()
        with pytest.raises(GrowkitError) as info:
            push(world["src"], "alice/x", token=TOKEN, endpoint=endpoint)
        elapsed = time.monotonic() - start
    message = str(info.value)
    assert message.startswith(f"{endpoint} did not answer within 1 s") and "GROWKIT_PUSH_TIMEOUT" in message, message
    assert server.held, "the client never connected"
    assert elapsed < 60


def test_credentials_in_the_endpoint_are_never_echoed(world, hub_env):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # closed again: connecting is refused
    with pytest.raises(GrowkitError) as info:
        push(world["src"], "alice/x", token=TOKEN, endpoint=f"http://alice:s3cretPassw0rd@127.0.0.1:{port}")
    message = str(info.value)
    assert f"cannot reach http://***@127.0.0.1:{port}" in message, message
    assert "s3cretPassw0rd" not in message and "alice:" not in message


def test_an_input_that_is_a_link_counts_where_it_is_and_where_it_points(tmp_path):
    """A Hub cache snapshot holds links to blobs elsewhere: an output containing the link contains an input."""
    from growkit.checkpoint.outputs import check_path

    blob = tmp_path / "blobs" / "abc123"
    blob.parent.mkdir()
    blob.write_bytes(b"weights")
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "model.safetensors").symlink_to(blob)
    link = snapshot / "model.safetensors"
    for out, inputs in ((snapshot, [link]), (tmp_path / "blobs", [link])):
        with pytest.raises(GrowkitError, match="output contains the input"):
            check_path(out, inputs)
