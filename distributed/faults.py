"""Fault injection for the Ray tests: a worker that dies once, the way a preempted node or an OOM kill looks.

The variable holds "key:marker"; the process that reaches `key` first creates `marker` and exits hard, so the
retry (task retry, Train restart) finds the marker and carries on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def die_once(variable: str, key: int, settle: Callable[[], object] | None = None) -> None:
    """`settle` runs just before the death: e.g. wait until Ray Train has registered the checkpoints already
    reported, so the restart must resume from them (a worker dying milliseconds after a report can lose it)."""
    spec = os.environ.get(variable, "")
    if not spec:
        return
    target, marker = spec.split(":", 1)
    if int(target) == key and not os.path.exists(marker):
        if settle is not None:
            settle()
        Path(marker).touch()
        os._exit(1)  # a dead worker, not an exception


def forwarded(variable: str) -> dict | None:
    """A runtime_env that hands the variable to Ray workers (they do not inherit the driver's later env)."""
    return {"env_vars": {variable: os.environ[variable]}} if os.environ.get(variable) else None
