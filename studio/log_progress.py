"""Progress as plain log lines when the output is not a terminal (a log file, a pipe, a CI job, ``nohup``).

rich's live progress bars draw nothing when the console is not a terminal, so ``studio render``, ``batch`` and
``demo`` were silent for minutes in a log. :class:`LineProgress` prints one line per finished unit of work (an
image of a batch) or, for fine-grained counters (denoising steps), at most one line every ``every_s`` seconds
plus the last one, each with the elapsed time and an estimate of the time left.
"""

from __future__ import annotations

import time
from typing import Callable


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class LineProgress:
    """``update(done)`` prints ``label: done/total detail (elapsed 12s, about 30s left)`` when due."""

    def __init__(self, print_line: Callable[[str], None], label: str, total: float, *, every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.print_line, self.label, self.total, self.every_s, self.clock = print_line, label, total, every_s, clock
        self.start = clock()
        self.last_print = None
        self.done = 0.0

    def line(self, done: float, detail: str = "") -> str:
        elapsed = self.clock() - self.start
        left = f", about {_clock(elapsed / done * (self.total - done))} left" if 0 < done < self.total else ""
        count = f"{done:g}/{self.total:g}"
        return f"{self.label}: {count}{' ' + detail if detail else ''} (elapsed {_clock(elapsed)}{left})"

    def update(self, done: float, detail: str = "", *, force: bool = False) -> None:
        """Record progress; print when forced, at the end, or ``every_s`` after the last line."""
        self.done = done
        now = self.clock()
        due = self.last_print is None and now - self.start >= self.every_s
        due = due or (self.last_print is not None and now - self.last_print >= self.every_s)
        if force or done >= self.total or due:
            self.print_line(self.line(done, detail))
            self.last_print = now


__all__ = ["LineProgress"]
