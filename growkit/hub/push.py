"""Upload a grown checkpoint to the Hugging Face Hub (`growkit push`).

Why a wrapper around `HfApi.upload_folder`: a half-written or inconsistent checkpoint on the Hub is worse than none
(people download it and get a load error), so the folder is checked first; and the library's multi-line HTTP errors
become one line that says what to do. The token is only ever handed to `HfApi`: it is never printed, logged or put
into an error message (messages are scrubbed of it anyway, in case a server echoes it back).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import typer

from growkit.errors import GrowkitError

CONFIG_NAME = "config.json"
# Never uploaded: hidden files and folders (growkit's temporary and data-cache folders, .incomplete markers) and
# training checkpoints (optimizer state for resuming, several times the model's size). The model, its tokenizer,
# card, provenance and training metrics are what a Hub repository is for.
PUSH_IGNORE = [".*", "*/.*", "checkpoint-*"]
_TRUE = {"1", "ON", "YES", "TRUE"}
REPO_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$"
_OFFLINE = "cannot push in offline mode: unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE)"
#: Seconds any one HTTP operation of a push (connect, send a chunk, wait for an answer) may take. huggingface_hub 2.x
#: leaves its client without a timeout (HF_HUB_ETAG_TIMEOUT / HF_HUB_DOWNLOAD_TIMEOUT govern downloads only), so an
#: endpoint that accepts and never answers would hang a push for ever.
PUSH_TIMEOUT_ENV = "GROWKIT_PUSH_TIMEOUT"
DEFAULT_PUSH_TIMEOUT = 120.0


@dataclass
class PushResult:
    """What was uploaded where; `commit_url` points at the commit on the Hub (or the endpoint given)."""

    repo_id: str
    commit_url: str
    commit_oid: str
    files: list[str] = field(default_factory=list)


def check_checkpoint_folder(folder: Path) -> list[str]:
    """Refuse a folder that would not load with `from_pretrained`, or that carries stale weights; return its weight
    file names.

    The reader (growkit.checkpoint) already checks that config.json parses, that every shard header is readable and
    that the index names existing shards and tensors. A push must be stricter than a read: config.json with a
    model_type, one safetensors layout (not loose files, not both), no shard outside the index, and each shard
    holding exactly the tensors the index assigns to it. Only headers are read, so this is cheap for any size.
    """
    from safetensors import safe_open

    from growkit.checkpoint.reader import WEIGHTS_INDEX_NAME, WEIGHTS_NAME, load_checkpoint

    folder = Path(folder)
    if not folder.is_dir():
        raise GrowkitError(f"{folder}: not a directory")
    if not (folder / CONFIG_NAME).is_file():
        raise GrowkitError(f"{folder}: not a complete checkpoint: no {CONFIG_NAME}")
    single, index_path = folder / WEIGHTS_NAME, folder / WEIGHTS_INDEX_NAME
    if not single.is_file() and not index_path.is_file():
        found = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".safetensors")) or ["none"]
        raise GrowkitError(
            f"{folder}: not a complete checkpoint: no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} "
            f"(other weights: {', '.join(found)}; growkit pushes safetensors checkpoints only)"
        )
    ckpt = load_checkpoint(folder)  # refuses a model.safetensors beside an index naming other shards (stale)
    _ = ckpt.model_type  # raises when config.json has none: AutoModel could not load it
    if single.is_file():
        return [WEIGHTS_NAME]

    weight_map: dict[str, str] = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    shards = sorted(set(weight_map.values()))
    stray = sorted(p.name for p in folder.glob("*.safetensors") if p.name not in shards)
    if stray:
        raise GrowkitError(f"{folder}: {stray[0]} is not in {WEIGHTS_INDEX_NAME} (stale shard?)")
    for shard in shards:
        with safe_open(str(folder / shard), framework="pt") as handle:
            in_shard = set(handle.keys())
        expected = {name for name, where in weight_map.items() if where == shard}
        if in_shard != expected:
            missing, extra = sorted(expected - in_shard), sorted(in_shard - expected)
            what = f"missing {missing[0]}" if missing else f"unlisted {extra[0]}"
            raise GrowkitError(f"{folder / shard}: disagrees with {WEIGHTS_INDEX_NAME} ({what})")
    return shards


def _offline() -> bool:
    """True when the user asked for offline mode, also if they set the variable after huggingface_hub was imported."""
    from huggingface_hub import constants

    env = any(os.environ.get(v, "").upper() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return env or constants.is_offline_mode()


def preflight(token: str | None = None) -> str:
    """What a push needs before any request, checked up front (a recipe checks it before hours of growing):
    not offline, and a token from the argument, HF_TOKEN or the huggingface_hub login. Returns the token."""
    from huggingface_hub import get_token

    if _offline():
        raise GrowkitError(_OFFLINE)
    resolved = token or get_token()
    if not resolved:
        raise GrowkitError(
            "no Hugging Face token: pass --token, set HF_TOKEN, or log in with `hf auth login` (needs write access)"
        )
    return resolved


def push(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> PushResult:
    """Create `repo_id` if needed (exist_ok) and upload `folder` in one commit; return where it landed.

    Hidden files and folders and `checkpoint-*` training states are not uploaded (PUSH_IGNORE).

    `endpoint` is the Hub's base URL (default: HF_ENDPOINT or the public Hub). A `revision` other than main is
    created as a branch first, because the Hub refuses commits to a branch that does not exist.
    """
    folder = Path(folder)
    check_checkpoint_folder(folder)
    if not re.match(REPO_ID_PATTERN, repo_id or ""):
        raise GrowkitError(f"repo id {repo_id!r}: expected NAMESPACE/NAME (e.g. your-user/tiny-gpt2-2x)")
    secret = preflight(token)

    from huggingface_hub import HfApi

    timeout = push_timeout()
    api = HfApi(endpoint=endpoint, token=secret)
    secrets = [secret, *_url_credentials(api.endpoint)]
    where = _scrub(api.endpoint, secrets)
    try:
        with _client_timeout(timeout):
            api.create_repo(repo_id, private=True if private else None, exist_ok=True)
            if revision and revision != "main" and not revision.startswith("refs/"):
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.upload_folder(
                folder_path=folder,
                repo_id=repo_id,
                revision=revision,
                commit_message=commit_message or f"Upload {folder.name} with growkit",
                ignore_patterns=list(PUSH_IGNORE),
            )
    except Exception as exc:  # noqa: BLE001 - every failure becomes one scrubbed line; see _explain
        raise GrowkitError(_scrub(_explain(exc, repo_id, where, timeout), secrets)) from None
    return PushResult(repo_id=repo_id, commit_url=str(info.commit_url), commit_oid=str(info.oid), files=_listed(folder))


def push_timeout() -> float:
    """The per-operation HTTP timeout of a push: GROWKIT_PUSH_TIMEOUT seconds, else DEFAULT_PUSH_TIMEOUT."""
    raw = os.environ.get(PUSH_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_PUSH_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise GrowkitError(f"{PUSH_TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return value


@contextmanager
def _client_timeout(seconds: float) -> Iterator[None]:
    """huggingface_hub's shared HTTP client, with a timeout, for the push only. A client factory the user installed
    (huggingface_hub.set_client_factory) is theirs, timeouts included, and left alone."""
    from huggingface_hub.utils import _http

    default = getattr(_http, "default_client_factory", None)
    if default is None or getattr(_http, "_GLOBAL_CLIENT_FACTORY", None) is not default:
        yield
        return

    def with_timeout() -> object:
        client = default()
        client.timeout = seconds
        return client

    _http.set_client_factory(with_timeout)
    try:
        yield
    finally:
        _http.set_client_factory(default)


def _url_credentials(url: str) -> list[str]:
    """The user-info part of a URL (`user:secret` in `http://user:secret@host`) and its password: never shown."""
    parts = urlsplit(url)
    netloc = parts.netloc
    found = [netloc.rpartition("@")[0]] if "@" in netloc else []
    return [*found, *([parts.password] if parts.password else [])]


def _listed(folder: Path) -> list[str]:
    """The files upload_folder sends: everything under `folder` but PUSH_IGNORE and what the library always skips."""
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return list(filter_repo_objects(paths, ignore_patterns=[*PUSH_IGNORE, *DEFAULT_IGNORE_PATTERNS]))


def _explain(exc: BaseException, repo_id: str, endpoint: str, timeout: float = DEFAULT_PUSH_TIMEOUT) -> str:
    """One line per failure kind, from the most telling exception in the chain (the library wraps some failures,
    e.g. an LFS upload's HTTP error inside a RuntimeError); the library's own text only as the last resort."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    chain, seen = [], exc
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for err in chain:
        if isinstance(err, OfflineModeIsEnabled):
            return _OFFLINE
        if isinstance(err, HfHubHTTPError) and err.response is not None:
            status = err.response.status_code
            if status == 401:
                return f"{endpoint} rejected the token (401 Unauthorized): check --token, HF_TOKEN or `hf auth login`"
            if status == 403:
                return f"the token may not write to {repo_id} (403 Forbidden): use a write token for that namespace"
            detail = " ".join((err.server_message or "").split()) or err.response.reason_phrase
            return f"push to {repo_id} failed: HTTP {status}: {detail}"
        if isinstance(err, TimeoutError) or type(err).__name__.endswith("Timeout"):
            return (f"{endpoint} did not answer within {timeout:g} s ({type(err).__name__}); check --endpoint and the "
                    f"network, or allow longer with {PUSH_TIMEOUT_ENV}=SECONDS")
        if type(err).__module__.startswith(("httpx", "httpcore")) or isinstance(err, ConnectionError):
            return f"cannot reach {endpoint}: {' '.join(str(err).split())}"
    return f"push to {repo_id} failed: {type(exc).__name__}: {' '.join(str(exc).split())}"


def _scrub(message: str, secrets: list[str]) -> str:
    """`message` with every secret (the token, credentials in the endpoint URL) replaced by ***, longest first."""
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        message = message.replace(secret, "***")
    return message


def push_command(
    folder: Path = typer.Argument(..., help="Checkpoint directory (config.json + safetensors) to upload."),
    repo_id: str = typer.Option(..., "--repo-id", help="NAMESPACE/NAME on the Hub; created if missing."),
    private: bool = typer.Option(False, "--private", help="Create the repository private."),
    revision: str | None = typer.Option(None, "--revision", help="Branch to commit to (created if missing)."),
    commit_message: str | None = typer.Option(None, "--commit-message", help="Commit title."),
    token: str | None = typer.Option(
        None, "--token", help="Hub token (prefer HF_TOKEN or `hf auth login`: a flag shows in the process list)."
    ),
    endpoint: str | None = typer.Option(None, "--endpoint", help="Hub base URL (default HF_ENDPOINT or the Hub)."),
) -> None:
    """Upload a checkpoint folder to the Hugging Face Hub (creates the repository if needed)."""
    result = push(folder, repo_id, private, revision, commit_message, token, endpoint)
    typer.echo(f"pushed {len(result.files)} files to {result.repo_id}: {result.commit_url}")
