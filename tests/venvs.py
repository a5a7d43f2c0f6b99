"""Fresh virtual environments for tests that must run the way a stranger's machine would: without this package, with
only what a requirements file names."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

# The CPU wheel this machine serves; a bare `torch` requirement would resolve to a multi-GB CUDA build first.
TORCH_PIN = "torch==2.13.0"


def _pip(python: Path, *args: str) -> None:
    command = [str(python), "-m", "pip", "install", "-qq", "--no-compile", "--disable-pip-version-check", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"


def make_venv(folder: Path, *install_args: str) -> Path:
    """A new virtualenv in `folder` with the pinned torch, then `pip install *install_args` (e.g. `-r file`).
    Returns its python."""
    venv.EnvBuilder(with_pip=True, clear=True).create(folder)
    python = folder / ("Scripts" if os.name == "nt" else "bin") / "python"
    _pip(python, TORCH_PIN)
    if install_args:
        _pip(python, *install_args)
    return python


def run_python(python: Path, script: str, env: dict[str, str], cwd: Path | None = None) -> str:
    """Runs `script` with `python` in `env` (nothing of this process's environment leaks in but PATH and HOME);
    returns its last line of output."""
    base = {name: os.environ[name] for name in ("PATH", "HOME", "TMPDIR") if name in os.environ}
    result = subprocess.run(
        [str(python), "-c", script], capture_output=True, text=True, env={**base, **env}, cwd=cwd, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout.strip().splitlines()[-1]


def this_python() -> Path:
    return Path(sys.executable)
