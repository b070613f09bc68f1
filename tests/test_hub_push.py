"""`growkit push` against a real HTTP server on 127.0.0.1 that speaks the Hub endpoints (tests/localhub.py)."""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import pytest

from growkit.errors import GrowkitError
from hub_fixtures import hub, hub_env, tiny_gpt2, tiny_llama  # noqa: F401 (fixtures)
from growkit.hub.push import check_checkpoint_folder, push
from cli_helper import run_cli
from localhub import READ_TOKEN, TOKEN, LocalHub


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_upload_single_file_checkpoint_arrives_byte_identical(hub, tiny_gpt2):
    result = push(tiny_gpt2, "alice/tiny-gpt2-2x", token=TOKEN, endpoint=hub.endpoint, commit_message="first")

    sent = local_files(tiny_gpt2)
    assert hub.files("alice/tiny-gpt2-2x") == sent
    assert sorted(result.files) == sorted(sent)
    assert result.commit_url == f"{hub.endpoint}/alice/tiny-gpt2-2x/commit/{result.commit_oid}"
    assert hub.repos["alice/tiny-gpt2-2x"].commits[0]["summary"] == "first"
    assert hub.repos["alice/tiny-gpt2-2x"].private is False
    assert hub.unhandled == []
    calls = hub.paths()
    # The calls huggingface_hub 2.4 makes, in order (README.md triggers metadata validation twice).
    assert calls[0] == "POST /api/repos/create"
    assert "POST /api/validate-yaml" in calls
    assert calls.count("POST /api/models/alice/tiny-gpt2-2x/preupload/main") == 1
    assert "POST /alice/tiny-gpt2-2x.git/info/lfs/objects/batch" in calls
    assert calls[-1] == "POST /api/models/alice/tiny-gpt2-2x/commit/main"
    # The weights went through LFS storage (a presigned-style PUT that carries no token); the API calls are authed.
    puts = [r for r in hub.requests if r.method == "PUT"]
    assert len(puts) == 1 and puts[0].body == sent["model.safetensors"]
    assert "authorization" not in puts[0].headers
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.requests if r.method != "PUT")


def test_upload_sharded_checkpoint_to_new_branch_of_existing_private_repo(hub, tiny_llama, tmp_path):
    push(tiny_llama, "org/tiny-llama", private=True, token=TOKEN, endpoint=hub.endpoint)
    assert hub.repos["org/tiny-llama"].private is True
    copy = tmp_path / "llama-copy"
    shutil.copytree(tiny_llama, copy)
    (copy / "NOTES.txt").write_text("second upload\n")
    for junk in (".data-cache/abc.bin", "checkpoint-100/optimizer.bin", "sub/.hidden", ".incomplete"):
        (copy / junk).parent.mkdir(parents=True, exist_ok=True)
        (copy / junk).write_bytes(b"not for the Hub")

    push(copy, "org/tiny-llama", revision="dev", token=TOKEN, endpoint=hub.endpoint)  # repo exists: 409 is fine

    assert hub.files("org/tiny-llama", "dev") == {**local_files(tiny_llama), "NOTES.txt": b"second upload\n"}
    assert "NOTES.txt" not in hub.files("org/tiny-llama", "main")
    assert hub.files("org/tiny-llama", "main") == local_files(tiny_llama)
    shards = [n for n in local_files(tiny_llama) if n.endswith(".safetensors")]
    assert len(shards) > 1
    # Shards identical between the two uploads are stored once: the second batch asks for no PUT.
    assert sum(r.method == "PUT" for r in hub.requests) == len(shards)
    assert "POST /api/models/org/tiny-llama/branch/dev" in hub.paths()
    assert hub.unhandled == []


def test_token_from_hf_token_env_and_from_login_file(hub, hub_env, tiny_gpt2, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    push(tiny_gpt2, "alice/from-env", endpoint=hub.endpoint)
    monkeypatch.delenv("HF_TOKEN")
    token_file = hub_env / "hf_home" / "token"
    token_file.parent.mkdir(parents=True)
    token_file.write_text(TOKEN)
    push(tiny_gpt2, "alice/from-login", endpoint=hub.endpoint)
    assert set(hub.repos) == {"alice/from-env", "alice/from-login"}


def _capture_all_logs():
    """A DEBUG handler on the root and on huggingface_hub's own (non-propagating) logger."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.DEBUG)
    loggers = [logging.getLogger(), logging.getLogger("huggingface_hub")]
    saved = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)

    def restore() -> str:
        for lg, level in saved:
            lg.removeHandler(handler)
            lg.setLevel(level)
        return stream.getvalue()

    return restore


@pytest.mark.parametrize("token,code", [("hf_wrongTokenValue9876543210zyxw", "401"), (READ_TOKEN, "403")])
def test_rejected_token_gives_one_clear_line_and_never_leaks(hub, tiny_gpt2, capsys, monkeypatch, token, code):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_DEBUG", True)  # the library's most verbose logging (it curlifies requests)
    restore = _capture_all_logs()
    try:
        with pytest.raises(GrowkitError) as info:
            push(tiny_gpt2, "alice/denied", token=token, endpoint=hub.endpoint)
    finally:
        logs = restore()
    message = str(info.value)
    assert code in message and "\n" not in message
    assert ("rejected the token" in message) if code == "401" else ("may not write to alice/denied" in message)
    assert info.value.__cause__ is None and info.value.__context__ is not None  # suppressed, not chained
    out = capsys.readouterr()
    assert "authenticated: True" in logs  # the capture really saw the library's request logging
    for text in (message, out.out, out.err, logs):
        assert token not in text
    assert hub.repos == {}


def test_server_echoing_the_token_is_scrubbed_from_the_error(hub, tiny_gpt2):
    hub.fail_commit = (500, "internal error while handling header {auth}")
    with pytest.raises(GrowkitError) as info:
        push(tiny_gpt2, "alice/echo", token=TOKEN, endpoint=hub.endpoint)
    message = str(info.value)
    assert "HTTP 500" in message and "Bearer ***" in message
    assert TOKEN not in message


def test_no_token_and_offline_fail_before_any_request(hub, tiny_gpt2, monkeypatch):
    with pytest.raises(GrowkitError, match="no Hugging Face token: pass --token, set HF_TOKEN"):
        push(tiny_gpt2, "alice/x", endpoint=hub.endpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(GrowkitError, match="offline mode: unset HF_HUB_OFFLINE"):
        push(tiny_gpt2, "alice/x", token=TOKEN, endpoint=hub.endpoint)
    assert hub.requests == []


def test_unreachable_endpoint_is_one_line(hub_env, tiny_gpt2):
    with LocalHub() as gone:
        endpoint = gone.endpoint  # a port that was just closed again
    with pytest.raises(GrowkitError, match=r"^cannot reach http://127\.0\.0\.1:\d+: ") as info:
        push(tiny_gpt2, "alice/x", token=TOKEN, endpoint=endpoint)
    assert "\n" not in str(info.value) and TOKEN not in str(info.value)


def _break(folder: Path, how: str) -> None:
    index = folder / "model.safetensors.index.json"
    shards = sorted(folder.glob("model-*.safetensors"))
    if how == "no-config":
        (folder / "config.json").unlink()
    elif how == "bin-only":
        for s in shards:
            s.unlink()
        index.unlink()
        (folder / "pytorch_model.bin").write_bytes(b"x")
    elif how == "missing-shard":
        shards[1].unlink()
    elif how == "stray-shard":
        shutil.copy(shards[0], folder / "model-00099-of-00099.safetensors")
    elif how == "truncated":
        data = shards[0].read_bytes()
        shards[0].write_bytes(data[: len(data) // 2])
    elif how == "index-disagrees":
        # Move one tensor of a multi-tensor shard to another shard in the index only: every file still exists
        # and every listed tensor exists somewhere, yet from_pretrained would look in the wrong file.
        meta = json.loads(index.read_text())
        wm = meta["weight_map"]
        name = next(n for n in wm if list(wm.values()).count(wm[n]) > 1)
        wm[name] = next(s.name for s in shards if s.name != wm[name])
        index.write_text(json.dumps(meta))
    elif how == "no-model-type":
        cfg = json.loads((folder / "config.json").read_text())
        del cfg["model_type"]
        (folder / "config.json").write_text(json.dumps(cfg))
    elif how == "both-layouts":
        shutil.copy(shards[0], folder / "model.safetensors")


@pytest.mark.parametrize(
    "how,expected",
    [
        ("no-config", r"not a complete checkpoint: no config\.json"),
        ("bin-only", r"no model\.safetensors or model\.safetensors\.index\.json \(other weights: pytorch_model\.bin"),
        ("missing-shard", r"index\.json: shard file missing: .*model-00002-of-\d+\.safetensors"),
        ("stray-shard", r"model-00099-of-00099\.safetensors is not in model\.safetensors\.index\.json"),
        ("truncated", r"model-00001-of-\d+\.safetensors: not a valid safetensors file"),
        ("index-disagrees", r"safetensors: disagrees with model\.safetensors\.index\.json \(missing "),
        ("both-layouts", r"both model\.safetensors and model\.safetensors\.index\.json"),
        ("no-model-type", r"config has no model_type"),
    ],
)
def test_incomplete_checkpoint_is_refused_before_any_request(hub, tiny_llama, tmp_path, how, expected):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_llama, folder)
    assert len(check_checkpoint_folder(folder)) > 1
    _break(folder, how)
    with pytest.raises(GrowkitError, match=expected):
        push(folder, "alice/broken", token=TOKEN, endpoint=hub.endpoint)
    assert hub.requests == []


def test_cli_push_success_and_401(hub, hub_env, tiny_gpt2):
    env = {"HF_TOKEN": TOKEN, "HF_HOME": str(hub_env / "hf_home"), "HF_HUB_DISABLE_XET": "1", "NO_PROXY": "127.0.0.1"}
    ok = run_cli(["push", str(tiny_gpt2), "--repo-id", "alice/cli", "--endpoint", hub.endpoint], env)
    assert ok.returncode == 0, ok.stderr
    assert f"to alice/cli: {hub.endpoint}/alice/cli/commit/" in ok.stdout
    assert hub.files("alice/cli") == local_files(tiny_gpt2)

    bad = "hf_cliWrongToken00000000000000000"
    denied = run_cli(["push", str(tiny_gpt2), "--repo-id", "alice/cli2", "--endpoint", hub.endpoint,
                      "--token", bad], env)
    assert denied.returncode == 2
    assert denied.stderr.startswith("error: ") and "401 Unauthorized" in denied.stderr
    assert "Traceback" not in denied.stderr
    for text in (ok.stdout, ok.stderr, denied.stdout, denied.stderr):
        assert TOKEN not in text and bad not in text
