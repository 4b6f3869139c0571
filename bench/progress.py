"""A small progress bar on stderr: case i/N, elapsed, ETA. Redraws one line on a terminal; prints
one line per update otherwise (CI logs)."""
from __future__ import annotations

import sys
import time


def _hms(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    def __init__(self, total: int, stream=None, width: int = 24):
        self.total, self.width = total, width
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()
        self.done = 0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def eta(self) -> float | None:
        """Mean time per finished case times the cases left (later cases are longer: a lower bound)."""
        if self.done == 0:
            return None
        return self.elapsed() / self.done * (self.total - self.done)

    def line(self, i: int, label: str) -> str:
        fill = int(self.width * self.done / max(self.total, 1))
        eta = self.eta()
        return (f"[{'#' * fill}{'.' * (self.width - fill)}] {i}/{self.total}  elapsed {_hms(self.elapsed())}"
                f"  ETA {_hms(eta) if eta is not None else '?'}  {label}")

    def start_case(self, i: int, name: str) -> None:
        self._write(self.line(i, name), final=False)

    def end_case(self, i: int, summary: str) -> None:
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
