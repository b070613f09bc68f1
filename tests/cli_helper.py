"""Run the real `growkit` command line in a subprocess (so the `error: ...` / exit 2 path is what users see)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from localhub import PROXY_VARS

REPO = Path(__file__).resolve().parent.parent


def run_cli(args: list[str], extra_env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m growkit.cli ARGS` with this checkout first on the path, no proxy and no inherited HF_TOKEN."""
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS and k != "HF_TOKEN"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-m", "growkit.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd or REPO, timeout=timeout)
