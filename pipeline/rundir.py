"""Run directory: where one run's config, environment, artifacts and results live.

Every command writes the fully resolved config, the package versions and the seeds first, so any
result found on disk later can be traced to exactly what produced it.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from repblend.pipeline.config import Config, to_yaml
from repblend.pipeline.hostmem import malloc_mode
from repblend.stages.errors import BusyError
from repblend.stages.io import read_json, write_json, write_text

_PACKAGES = ("repblend", "torch", "torchvision", "timm", "transformers", "ray", "faiss-cpu", "open_clip_torch",
             "webdataset", "safetensors", "omegaconf", "numpy")


def default_run_dir(config: Config) -> Path:
    return Path("runs") / (config.run.name or "run")


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


@contextlib.contextmanager
def run_dir_lock(run_dir: Path, command: str) -> Iterator[None]:
    """One command at a time in a run directory: a second one (the same command started twice, or `eval` while
    `run` distils) would interleave checkpoints, metrics rows and results. The lock is the kernel's (flock on
    RUN_DIR/.lock), so a killed command never leaves it held."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise BusyError(f"{run_dir} is in use by {holder}; wait for it to finish, or give another --run-dir") \
                from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"repblend {command} (pid {os.getpid()} on {socket.gethostname()})\n")
        handle.flush()
        yield


def prepare_run_dir(config: Config, path: Path, command: str) -> Path:
    """Create the run directory and record config, versions and seeds (before any work starts)."""
    path.mkdir(parents=True, exist_ok=True)
    write_text(path / "config.yaml", to_yaml(config))
    write_json(path / "env.json", {
        "command": command,
        "argv": sys.argv,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": _git_commit(),
        "packages": package_versions(),
        "malloc": malloc_mode(),
        "seeds": {"run.seed": config.run.seed},
    })
    return path


def mark_stage_done(run_dir: Path, stage: str, record: dict) -> None:
    """`stages.json` says which stages completed and where their outputs are."""
    state_path = run_dir / "stages.json"
    state = read_json(state_path) if state_path.is_file() else {}
    state[stage] = {**record, "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    write_json(state_path, state)
