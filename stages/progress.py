"""Progress of long loops: a tqdm bar on a terminal, and a log line every few seconds anywhere else.

tqdm switches itself off when stderr is not a terminal, which is where long jobs write: nohup, Slurm, `ray job
submit`, a Ray worker. There a 20-minute distillation printed nothing between its first and its last line.
`progress_bar` keeps the bar for terminals and otherwise logs the count, the rate and the time left (and the
loop's latest figures) at most every `every` seconds, plus one closing line.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Callable

from tqdm import tqdm

log = logging.getLogger("repblend")

DEFAULT_EVERY = 30.0  # seconds between log lines off a terminal (run.progress_every)


class LogProgress:
    """The part of tqdm's interface the loops use (update, set_postfix, close, a context manager), as log lines."""

    def __init__(self, total: int, *, desc: str, unit: str, initial: int = 0, every: float = DEFAULT_EVERY,
                 logger: logging.Logger = log, clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.initial = self.n = initial
        self._log, self._clock = logger, clock
        self._started = self._last = clock()
        self._logged_n = initial
        self._postfix = ""

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._clock() - self._last >= self.every and self.n < self.total:
            self._emit()

    def set_postfix(self, **values: Any) -> None:
        self._postfix = " ".join(f"{key}={value}" for key, value in values.items())

    def close(self) -> None:
        """One closing line, if anything was done since the last: the count reached and the total time."""
        if self.n > self._logged_n:
            self._emit(closing=True)
        self._logged_n = self.n

    def line(self, *, closing: bool = False) -> str:
        elapsed = self._clock() - self._started
        done = self.n - self.initial
        parts = [f"{self.desc}: {self.n}/{self.total} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            parts.append(f"{rate:.1f} {self.unit}/s" if rate >= 1 else f"{1 / rate:.2f} s/{self.unit}")
            if closing:
                parts.append(f"in {tqdm.format_interval(elapsed)}")
            elif self.total > self.n:
                parts.append(f"{tqdm.format_interval((self.total - self.n) / rate)} left")
        text = ", ".join(parts)
        return f"{text}; {self._postfix}" if self._postfix else text

    def _emit(self, closing: bool = False) -> None:
        self._log.info("%s", self.line(closing=closing))
        self._last, self._logged_n = self._clock(), self.n

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(total: int, *, desc: str, unit: str, initial: int = 0, enabled: bool = True,
                 every: float = DEFAULT_EVERY) -> tqdm | LogProgress:
    """A tqdm bar when stderr is a terminal, log lines when it is not, nothing when `enabled` is false."""
    if not enabled:
        return tqdm(total=total, initial=initial, disable=True)
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit)
    return LogProgress(total, desc=desc, unit=unit, initial=initial, every=every)
