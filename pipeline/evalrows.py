"""Finished rows of the results table, kept in the run directory as they finish.

A row trains fresh models over several seeds: seconds on a demo, minutes per row for LoRS sets or large splits on
a CPU. Kept rows let a run killed during evaluation keep what it had measured, and let a rerun (or `repblend eval`
after a method was added to `eval.methods`) train only the rows whose inputs changed. A row is read back only when
its key matches: the content of the set and of the feature caches, the training settings, the protocol, the seeds,
the device, torch and the package's own source code, so no change of data, setting or code reuses a stale number.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch

from repblend.stages.io import read_json, write_json

# a child of "repblend" (same handlers and level), so that a caller can quiet the row lines alone: `repblend tune`
# logs its reruns' rows from the driver
log = logging.getLogger("repblend.eval")


@cache
def source_digest() -> str:
    """SHA-256 over the package's Python files: an evaluation measured by other code is not read back."""
    import importlib

    digest = hashlib.sha256()
    for package in ("repblend", "repblend.pipeline", "repblend.stages", "repblend.distributed"):
        for path in sorted(Path(importlib.import_module(package).__file__).parent.glob("*.py")):
            digest.update(f"{package}.{path.stem}".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _plain(key: dict) -> dict:
    """The key as JSON reads it back (dataclasses as dicts, tuples as lists), so a saved key compares equal."""
    def default(value):
        return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else str(value)

    return json.loads(json.dumps(key, sort_keys=True, default=default))


class KeptRows:
    """`row(name, key, measure)`: the kept metrics of `name` where its key matches, else `measure()`, kept."""

    def __init__(self, folder: Path, common: dict, reuse: bool, device: torch.device):
        self.folder = folder
        self.common = {**common, "device": device.type, "torch": torch.__version__, "code": source_digest()}
        self.reuse = reuse

    def row(self, name: str, key: dict, measure: Callable[[], dict]) -> dict:
        path = self.folder / f"{name}.json"
        full_key = _plain({**self.common, **key, "row": name})
        started = time.perf_counter()
        if self.reuse and path.is_file():
            saved = read_json(path)
            if saved.get("key") == full_key:
                log_row(name, saved["metrics"], f"read back from {path}")
                return saved["metrics"]
        metrics = measure()
        write_json(path, {"key": full_key, "metrics": metrics})
        log_row(name, metrics, f"{time.perf_counter() - started:.0f} s")
        return metrics


def log_row(name: str, metrics: dict, how: str) -> None:
    """One line per finished row: evaluation of a large split takes minutes, and should be seen to progress."""
    mean = {key: metrics[key]["mean"] for key in ("img_r10", "txt_r10", "r_mean")}
    log.info("eval %s: img_r10 %.2f  txt_r10 %.2f  r_mean %.2f (%s)", name, *mean.values(), how)
    if metrics.get("diverged_seeds"):
        log.warning("eval %s: training diverged (non-finite embeddings) in %d seed(s); each scores 0 in the row",
                    name, metrics["diverged_seeds"])
