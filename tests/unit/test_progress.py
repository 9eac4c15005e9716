"""saq_deploy.utils.progress: a bar on a terminal, rate-limited plain lines in logs, nothing when off."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from saq_deploy.errors import ConfigError
from saq_deploy.utils.progress import INTERVAL_ENV, LOGGER_NAME, Progress, format_duration, interval_from_env

ROOT = Path(__file__).resolve().parents[2]
LINE = re.compile(r"^(?P<name>[\w-]+): (?P<desc>.+) (?P<done>\d+)/(?P<total>\d+) \((?P<pct>\d+)%\) "
                  r"(?P<elapsed>\d+:\d\d:\d\d) elapsed(, ~(?P<left>\d+:\d\d:\d\d) left)?$")


class Clock:
    """A hand-moved clock: the rate limit is tested without sleeping."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(steps: int, dt: float, interval: float, **kw) -> list[str]:
    clock, buf = Clock(), io.StringIO()
    with Progress("calibrate", stream=buf, interval=interval, clock=clock, **kw) as p:
        task = p.task("collect trajectories", total=steps)
        for _ in range(steps):
            clock.now += dt
            task.advance(1)
    return buf.getvalue().splitlines()


def test_lines_are_rate_limited_with_counts_percent_and_eta():
    # 600 one-second steps with a 10 s interval: the start line, one every 10 s, and the last
    lines = _run(600, 1.0, 10.0)
    assert len(lines) == 1 + 60
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines[:3]
    assert lines[0] == "calibrate: collect trajectories 0/600 (0%) 0:00:00 elapsed"
    assert lines[1] == "calibrate: collect trajectories 10/600 (1%) 0:00:10 elapsed, ~0:09:50 left"
    assert lines[-1] == "calibrate: collect trajectories 600/600 (100%) 0:10:00 elapsed"
    done = [int(m["done"]) for m in parsed]
    assert done == sorted(done) and done[-1] == 600
    assert all(int(m["pct"]) == int(100 * int(m["done"]) / 600) for m in parsed[:-1])


def test_first_and_last_lines_are_written_even_inside_one_interval():
    lines = _run(50, 0.01, 10.0)  # the whole loop takes 0.5 s
    assert [LINE.match(line)["done"] for line in lines] == ["0", "50"]


def test_interval_zero_writes_every_update():
    lines = _run(5, 1.0, 0.0)
    assert [LINE.match(line)["done"] for line in lines] == ["0", "1", "2", "3", "4", "5"]


def test_description_updates_show_in_the_next_line_and_resume_counts_own_rate():
    clock, buf = Clock(), io.StringIO()
    with Progress("calibrate", stream=buf, interval=5.0, clock=clock) as p:
        task = p.task("reconstruct", total=10, completed=4)  # resumed after 4 blocks
        clock.now += 60
        task.update(description="reconstruct down_blocks.0 loss 0.0123")  # no new block, still a line
        clock.now += 60
        task.update(completed=5, description="reconstruct down_blocks.1")
    lines = buf.getvalue().splitlines()
    assert lines[0] == "calibrate: reconstruct 4/10 (40%) 0:00:00 elapsed"
    assert lines[1] == "calibrate: reconstruct down_blocks.0 loss 0.0123 4/10 (40%) 0:01:00 elapsed"
    # one block in 120 s, five to go: ~10 min, not the 2.5 min that counting the resumed 4 would say
    assert lines[2] == "calibrate: reconstruct down_blocks.1 5/10 (50%) 0:02:00 elapsed, ~0:10:00 left"


def test_a_loop_stopped_early_writes_where_it_stopped():
    clock, buf = Clock(), io.StringIO()
    with Progress("calibrate", stream=buf, interval=10.0, clock=clock) as p:
        task = p.task("reconstruct", total=10)
        clock.now += 1
        task.advance(3)  # within the interval: held back
    assert buf.getvalue().splitlines()[-1].startswith("calibrate: reconstruct 3/10 (30%) 0:00:01 elapsed")


def test_lines_go_to_the_progress_logger(caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
        _run(3, 1.0, 0.0)
    msgs = [r.getMessage() for r in caplog.records if r.name == LOGGER_NAME]
    assert msgs[0] == "calibrate: collect trajectories 0/3 (0%) 0:00:00 elapsed" and len(msgs) == 4


def test_disabled_writes_nothing(caplog):
    buf = FakeTTY()
    with caplog.at_level(logging.INFO, logger=LOGGER_NAME), \
            Progress("calibrate", enabled=False, stream=buf, interval=0.0) as p:
        assert p.mode == "off"
        task = p.task("x", total=3)
        for _ in range(3):
            task.advance(1, description="y")
    assert buf.getvalue() == "" and not [r for r in caplog.records if r.name == LOGGER_NAME]


def test_mode_follows_isatty():
    assert Progress(stream=io.StringIO(), interval=0).mode == "lines"
    assert Progress(stream=FakeTTY(), interval=0).mode == "bar"

    class Closed(io.StringIO):
        def isatty(self):
            raise ValueError("I/O operation on closed file")

    assert Progress(stream=Closed(), interval=0).mode == "lines"


def test_tty_mode_draws_a_rich_bar_not_log_lines(caplog):
    buf = FakeTTY()
    with caplog.at_level(logging.INFO, logger=LOGGER_NAME), Progress("calibrate", stream=buf) as p:
        task = p.task("collect trajectories", total=4)
        for _ in range(4):
            task.advance(1)
    out = buf.getvalue()
    assert "collect trajectories" in out and "4/4" in out and "\x1b[" in out  # ANSI: a live bar
    assert "calibrate:" not in out  # no plain lines beside the bar
    assert not [r for r in caplog.records if r.name == LOGGER_NAME]


def test_interval_env(monkeypatch):
    monkeypatch.delenv(INTERVAL_ENV, raising=False)
    assert interval_from_env() == 10.0
    monkeypatch.setenv(INTERVAL_ENV, "2.5")
    assert interval_from_env() == 2.5
    for bad in ("soon", "-1", "nan", "inf"):
        monkeypatch.setenv(INTERVAL_ENV, bad)
        with pytest.raises(ConfigError, match=INTERVAL_ENV):
            interval_from_env()


def test_format_duration():
    assert [format_duration(s) for s in (0, 31, 130, 3725)] == ["0:00:00", "0:00:31", "0:02:10", "1:02:05"]


def test_import_stays_light():
    code = "import sys, saq_deploy.utils.progress; print('rich' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.slow
def test_calibrate_piped_to_a_log_writes_progress_lines(tmp_path):
    # stderr is a pipe, as in `make demo > log 2>&1`: rich alone would print nothing here
    # one torch thread: on a busy 2-core runner its thread pool fighting other jobs took 263 s, not 41 s
    env = {**os.environ, INTERVAL_ENV: "0", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "saq_deploy.cli.app", "calibrate", "-c",
           str(ROOT / "calibration/digits_w8a8_sa-ptq.toml"), "--num-samples", "2", "--steps", "2",
           "--iters", "2", "-o", str(tmp_path / "art")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [m for m in map(LINE.match, proc.stderr.splitlines()) if m and m["name"] == "calibrate"]
    collect = [m for m in lines if m["desc"] == "collect trajectories"]
    # 2 samples x 2 DPM-Solver-2 steps = 4 records, batch of 2 per step: start, 2, 4
    assert [(m["done"], m["total"]) for m in collect] == [("0", "4"), ("2", "4"), ("4", "4")]
    recon = [m for m in lines if m["desc"].startswith("reconstruct")]
    assert recon and recon[-1]["done"] == recon[-1]["total"] and recon[-1]["pct"] == "100"
    assert "calibrate:" not in proc.stdout  # results stay on stdout, progress on stderr


def test_stderr_lines_are_not_doubled_when_logging_prints_them(capsys, caplog):
    # an app that configured logging (the server's basicConfig) gets each line once, from logging
    with caplog.at_level(logging.INFO, logger=LOGGER_NAME), Progress("sample", interval=0.0) as p:
        p.task("sampling", total=1).advance(1)
    assert capsys.readouterr().err == ""
    assert len([r for r in caplog.records if r.name == LOGGER_NAME]) == 2
    # unconfigured logging (INFO dropped): the lines go to stderr directly
    with Progress("sample", interval=0.0) as p:
        p.task("sampling", total=1).advance(1)
    assert capsys.readouterr().err.splitlines() == ["sample: sampling 0/1 (0%) 0:00:00 elapsed",
                                                    "sample: sampling 1/1 (100%) 0:00:00 elapsed"]


@pytest.mark.slow
def test_train_classifier_reports_each_epoch():
    from saq_deploy.eval.classifier import train_classifier

    heard = []
    _, report = train_classifier(0, epochs=2, on_epoch=lambda e, loss: heard.append((e, loss)))
    assert [e for e, _ in heard] == [1, 2]
    assert heard[-1][1] == report["final_train_loss"] and heard[1][1] < heard[0][1]
