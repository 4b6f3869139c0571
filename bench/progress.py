"""A small progress bar on stderr: case i/N, elapsed, ETA. Redraws one line on a terminal; prints
one line per update otherwise (CI logs)."""
from __future__ import annotations

import sys
import time


def _hms(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """`estimates`: seconds per case estimated before anything ran (bench/estimate.py). With them
    the ETA is the estimates left, scaled by what the finished cases took against theirs (so it
    is there from the first case); without them, the mean time per finished case."""

    def __init__(self, total: int, stream=None, width: int = 24, estimates=None):
        self.total, self.width = total, width
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()
        self.done = 0
        self.estimates = list(estimates) if estimates is not None else None
        self.case_start = None   # when the first case started (builds and the roofline come before)
        self.case_time = 0.0     # seconds the finished cases took
        self._t_case = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def scale(self) -> float:
        """Measured / estimated seconds of the finished cases (1 before any finished), clamped to
        [0.2, 20]: one odd case must not swing the ETA by more than that."""
        est = sum(self.estimates[:self.done]) if self.estimates else 0.0
        if self.done == 0 or est <= 0:
            return 1.0
        return min(20.0, max(0.2, self.case_time / est))

    def eta(self) -> float | None:
        if self.estimates is not None:
            left = sum(self.estimates[self.done:])
            running = 0.0
            if self._t_case is not None and self.done < len(self.estimates):  # the case under way
                running = min(time.perf_counter() - self._t_case, self.scale() * self.estimates[self.done])
            return max(0.0, self.scale() * left - running)
        if self.done == 0:
            return None
        return self.elapsed() / self.done * (self.total - self.done)

    def line(self, i: int, label: str) -> str:
        fill = int(self.width * self.done / max(self.total, 1))
        eta = self.eta()
        return (f"[{'#' * fill}{'.' * (self.width - fill)}] {i}/{self.total}  elapsed {_hms(self.elapsed())}"
                f"  ETA {_hms(eta) if eta is not None else '?'}  {label}")

    def start_case(self, i: int, name: str) -> None:
        self._t_case = time.perf_counter()
        if self.case_start is None:
            self.case_start = self._t_case
        self._write(self.line(i, name), final=False)

    def end_case(self, i: int, summary: str) -> None:
        if self._t_case is not None:
            self.case_time += time.perf_counter() - self._t_case
            self._t_case = None
        self.done = i
        self._write(self.line(i, summary), final=True)

    def message(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
        print(text, file=self.stream, flush=True)

    def _write(self, text: str, final: bool) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + text[:200] + ("\n" if final else ""))
            self.stream.flush()
        else:
            print(text, file=self.stream, flush=True)
