"""Progress for long loops that also shows in logs.

    with progress(enabled, "calibrate") as p:
        task = p.task("collect trajectories", total=64)
        for ...:
            task.advance(8)            # or task.update(completed=..., description=...)

On a terminal (stderr is a TTY) this is a rich bar, as before. Anywhere else (``make demo > log``,
CI, ``nohup``) rich would print nothing at all, so plain lines are written instead, e.g.

    calibrate: collect trajectories 12/64 (19%) 0:00:31 elapsed, ~0:02:10 left

at most one every ``SAQ_DEPLOY_PROGRESS_INTERVAL`` seconds (default 10) plus the first and the
last, so a 10-minute run writes about 60 lines rather than one per batch. ``enabled=False`` writes
nothing. The bar and the lines go to stderr, keeping stdout for results (JSON, paths).

Kept light: rich is imported only when a bar is drawn."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Self, TextIO

from saq_deploy.errors import ConfigError

INTERVAL_ENV = "SAQ_DEPLOY_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 10.0
LOGGER_NAME = "saq_deploy.progress"

_log = logging.getLogger(LOGGER_NAME)


def interval_from_env() -> float:
    """Seconds between plain progress lines: ``SAQ_DEPLOY_PROGRESS_INTERVAL`` or 10."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):  # also refuses nan
        raise ConfigError(f"{INTERVAL_ENV} must be a number of seconds >= 0, got {raw!r}")
    return value


def format_duration(seconds: float) -> str:
    """``h:mm:ss``, the form rich's bar uses, so terminal and log read the same."""
    s = max(0, int(seconds + 0.5))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class _NullTask:
    """What ``task()`` returns when progress is off: every call is a no-op."""

    def advance(self, n: float = 1, *, description: str | None = None) -> None:
        pass

    def update(self, *, completed: float | None = None, description: str | None = None) -> None:
        pass


class _BarTask:
    def __init__(self, bar, task_id) -> None:
        self._bar, self._id = bar, task_id

    def advance(self, n: float = 1, *, description: str | None = None) -> None:
        self._bar.update(self._id, advance=n, description=description)

    def update(self, *, completed: float | None = None, description: str | None = None) -> None:
        self._bar.update(self._id, completed=completed, description=description)


class _LineTask:
    """Counts like a bar, but writes a line only when the rate limit allows (or at start/end)."""

    def __init__(self, owner: Progress, description: str, total: float | None, completed: float) -> None:
        self._owner = owner
        self.description, self.total, self.completed = description, total, completed
        self._start_completed, self._t0 = completed, owner.clock()
        self._last_emit: float | None = None
        self._dirty = True  # state not yet written
        self._finished_written = False
        self._maybe_emit()  # the first line says what is running before the first (slow) step ends

    @property
    def finished(self) -> bool:
        return self.total is not None and self.completed >= self.total

    def advance(self, n: float = 1, *, description: str | None = None) -> None:
        self.update(completed=self.completed + n, description=description)

    def update(self, *, completed: float | None = None, description: str | None = None) -> None:
        if completed is not None and completed != self.completed:
            self.completed, self._dirty = completed, True
        if description is not None and description != self.description:
            self.description, self._dirty = description, True
        self._maybe_emit()

    def flush(self) -> None:
        """Write the latest state if it was held back (a loop that stopped early, or an error)."""
        if self._dirty and not self._finished_written:
            self._emit(self._owner.clock())

    def _maybe_emit(self) -> None:
        if not self._dirty or self._finished_written:
            return
        now = self._owner.clock()
        due = self._last_emit is None or now - self._last_emit >= self._owner.interval
        if due or self.finished:
            self._emit(now)

    def _emit(self, now: float) -> None:
        self._last_emit, self._dirty = now, False
        self._finished_written = self.finished
        self._owner.write(self.line(now))

    def line(self, now: float) -> str:
        elapsed = now - self._t0
        done = _num(self.completed)
        if self.total is None:
            count = f"{done} done"
        else:
            # floored, so "100%" only ever means finished (599/600 is 99%)
            pct = 100 if self.total <= 0 else min(100, math.floor(100 * self.completed / self.total))
            count = f"{done}/{_num(self.total)} ({pct}%)"
        text = f"{self._owner.name}: {self.description} {count} {format_duration(elapsed)} elapsed"
        gained = self.completed - self._start_completed  # a resumed run counts only its own rate
        if self.total is not None and not self.finished and gained > 0 and elapsed > 0:
            text += f", ~{format_duration((self.total - self.completed) * elapsed / gained)} left"
        return text


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


class Progress:
    """Context manager handing out tasks; pick the mode with :func:`progress` unless testing.

    ``mode``: "bar" (rich), "lines" (plain, rate-limited) or "off"; None picks "bar" when
    ``stream`` is a terminal and "lines" otherwise. ``clock`` and ``interval`` are injectable so
    the rate limit can be tested without sleeping."""

    def __init__(self, name: str = "saq-deploy", *, enabled: bool = True, mode: str | None = None,
                 stream: TextIO | None = None, interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic, transient: bool = False) -> None:
        self.name, self.clock, self.transient = name, clock, transient
        self.stream = stream if stream is not None else sys.stderr
        if not enabled:
            mode = "off"
        elif mode is None:
            mode = "bar" if _isatty(self.stream) else "lines"
        if mode not in ("bar", "lines", "off"):
            raise ValueError(f"mode must be 'bar', 'lines' or 'off', got {mode!r}")
        self.mode = mode
        self.interval = (interval_from_env() if interval is None else float(interval)) if mode == "lines" else 0.0
        self._bar = None
        self._tasks: list[_LineTask] = []

    def __enter__(self) -> Self:
        if self.mode == "bar":
            import rich.progress as rp  # lazy: rich costs ~100 ms to import
            from rich.console import Console

            columns = (rp.TextColumn("{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn(),
                       rp.TaskProgressColumn(), rp.TimeElapsedColumn(), rp.TimeRemainingColumn())
            # the bar is drawn on stderr (the stream found to be a terminal); stdout is not
            # redirected into it, so results printed meanwhile still land on stdout
            self._bar = rp.Progress(*columns, console=Console(file=self.stream), transient=self.transient,
                                    redirect_stdout=False)
            self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for t in self._tasks:
            t.flush()
        if self._bar is not None:
            self._bar.__exit__(*exc)
            self._bar = None

    def task(self, description: str, total: float | None, completed: float = 0):
        """A task with ``advance(n)`` and ``update(completed=, description=)``."""
        if self.mode == "off":
            return _NullTask()
        if self.mode == "bar":
            if self._bar is None:
                raise RuntimeError("Progress.task() needs the Progress context to be entered")
            return _BarTask(self._bar, self._bar.add_task(description, total=total, completed=completed))
        t = _LineTask(self, description, total, completed)
        self._tasks.append(t)
        return t

    def write(self, line: str) -> None:
        # always a log record; the direct stderr write is skipped when logging is set up to take INFO
        # records, since the app then chose where they go (a server's basicConfig already prints them
        # on stderr, so the line would show twice)
        _log.info(line)
        if not (_log.isEnabledFor(logging.INFO) and _log.hasHandlers()) or self.stream is not sys.stderr:
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass  # a closed or broken log pipe must not kill a long run over a progress line


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):
        return False


def progress(enabled: bool, name: str = "saq-deploy", *, transient: bool = False) -> Progress:
    """The progress context for a long loop: a bar on a terminal, log lines elsewhere, or nothing."""
    return Progress(name, enabled=enabled, transient=transient)
