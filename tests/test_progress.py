"""Progress off a terminal: log lines at the configured interval with count, rate, time left and the loop's
figures, one closing line; a bar on a terminal; nothing when switched off."""

from __future__ import annotations

import io
import logging

import pytest
from tqdm import tqdm

from repblend.pipeline.config import load_config
from repblend.stages import progress
from repblend.stages.errors import ConfigError
from repblend.stages.progress import LogProgress, progress_bar


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "repblend"]


def test_log_lines_come_at_the_interval_with_rate_time_left_and_figures(caplog) -> None:
    caplog.set_level(logging.INFO, logger="repblend")
    clock = Clock()
    bar = LogProgress(200, desc="distill", unit="it", initial=50, every=30, clock=clock)
    for _ in range(60):  # 1.5 s per iteration: a line every 30 s, i.e. every 20 iterations
        clock.now += 1.5
        bar.set_postfix(loss="0.8312", lr_img="0.0980")
        bar.update()
    assert _lines(caplog) == [  # 20 done since the start (at 50) in 30 s; 130 left at 1.5 s -> 195 s
        "distill: 70/200 it (35%), 1.50 s/it, 03:15 left; loss=0.8312 lr_img=0.0980",
        "distill: 90/200 it (45%), 1.50 s/it, 02:45 left; loss=0.8312 lr_img=0.0980",
        "distill: 110/200 it (55%), 1.50 s/it, 02:15 left; loss=0.8312 lr_img=0.0980",
    ]
    clock.now += 1
    for _ in range(90):
        bar.update()  # the rest at once: 150 in 91 s
    bar.close()
    bar.close()  # nothing new: no second closing line
    assert _lines(caplog)[3:] == ["distill: 200/200 it (100%), 1.6 it/s, in 01:31; loss=0.8312 lr_img=0.0980"]


def test_a_loop_with_nothing_to_do_logs_nothing_and_zero_interval_logs_every_update(caplog) -> None:
    caplog.set_level(logging.INFO, logger="repblend")
    clock = Clock()
    with LogProgress(10, desc="buffer experts", unit="expert", initial=10, clock=clock):
        pass
    assert _lines(caplog) == []
    with LogProgress(3, desc="encode dev images", unit="img", every=0, clock=clock) as bar:
        for _ in range(3):
            clock.now += 2
            bar.update()
    assert _lines(caplog) == ["encode dev images: 1/3 img (33%), 2.00 s/img, 00:04 left",
                              "encode dev images: 2/3 img (67%), 2.00 s/img, 00:02 left",
                              "encode dev images: 3/3 img (100%), 2.00 s/img, in 00:06"]


def test_a_terminal_gets_a_bar_a_file_gets_log_lines_and_off_is_silent(monkeypatch) -> None:
    terminal = io.StringIO()
    terminal.isatty = lambda: True  # type: ignore[method-assign]
    monkeypatch.setattr(progress.sys, "stderr", terminal)
    bar = progress_bar(5, desc="distill", unit="it")
    assert isinstance(bar, tqdm) and not bar.disable
    bar.close()
    monkeypatch.setattr(progress.sys, "stderr", io.StringIO())
    assert isinstance(progress_bar(5, desc="distill", unit="it", every=7), LogProgress)
    assert progress_bar(5, desc="distill", unit="it", every=7).every == 7
    off = progress_bar(5, desc="distill", unit="it", enabled=False)
    assert isinstance(off, tqdm) and off.disable


def test_progress_every_is_a_config_key_and_refuses_a_negative_interval() -> None:
    assert load_config(None, ["run.progress_every=5"]).run.progress_every == 5
    with pytest.raises(ConfigError, match=r"run.progress_every=-1.0 must be >= 0"):
        load_config(None, ["run.progress_every=-1"])
