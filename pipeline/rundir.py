"""Run directory: where one run's config, environment, artifacts and results live.

Every command writes the fully resolved config, the package versions and the seeds first, so any
result found on disk later can be traced to exactly what produced it.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import socket
import subprocess
import sys
from pathlib import Path

from repblend.pipeline.config import Config, to_yaml
from repblend.pipeline.hostmem import malloc_mode
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


def prepare_run_dir(config: Config, run_dir: str | Path | None, command: str) -> Path:
    """Create the run directory and record config, versions and seeds (before any work starts)."""
    path = Path(run_dir) if run_dir else default_run_dir(config)
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
