"""Progress on stderr, as a person follows it.

On a terminal: a live block at the bottom of the screen, one line per layer being built (its name, time so far
and step) and one per transfer (bytes, rate, ETA), redrawn every second, with the lines of build steps scrolling
above it. Not on a terminal (a pipe, a CI log), or with ``--json``: plain lines, each starting with the time of
day. With ``-q``: nothing; errors are ``cli.main``'s to print. When layers build at once, each line of a layer's
output starts with its name ("go | …").
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, TextIO

from ..events import LayerEvent, event_lines

Mode = Literal["live", "lines", "quiet"]


def progress_of(args: argparse.Namespace, *, jobs: int = 1, stream: TextIO | None = None) -> Progress:
    """The progress of a command: quiet with -q, live on a terminal unless --json, lines otherwise."""
    out = stream or sys.stderr
    mode: Mode = "lines"
    if getattr(args, "quiet", False):
        mode = "quiet"
    elif not getattr(args, "json", False) and out.isatty() and os.environ.get("TERM", "") != "dumb":
        mode = "live"
    return Progress(out, mode, prefix=jobs > 1)


@dataclass
class _Transfer:
    what: str
    started: float
    done: Callable[[], int]  # bytes moved so far, counted from ``base``
    base: int
    total: int | None


class Progress:
    """Where a command's progress goes: :meth:`line` (an ``Output`` callback), :meth:`event` (an ``Events``
    callback of the planner) and :meth:`transfer` (a live line while bytes move). Safe from several threads.
    Close it (or leave its with-block) before anything else is printed: the live block is erased then."""

    def __init__(self, stream: TextIO, mode: Mode, *, prefix: bool = False,
                 clock: Callable[[], float] = time.monotonic, columns: Callable[[], int] | None = None,
                 tick: float = 1.0) -> None:
        self._stream, self.mode, self._clock, self._tick = stream, mode, clock, tick
        self._columns = columns or (lambda: shutil.get_terminal_size().columns)
        self._mutex = threading.RLock()
        self._layers: dict[str, tuple[float, str]] = {}  # name → (started, step)
        self._transfers: dict[int, _Transfer] = {}
        self._next_transfer = 0
        self._drawn = 0  # lines of the live block on the screen, below the cursor's line
        self._closed = threading.Event()
        self._ticker: threading.Thread | None = None
        self._lines = event_lines(self._scroll if mode == "live" else self.line, prefix=prefix, clock=clock)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def line(self, text: str) -> None:
        """A progress line (or a line of a build step's output)."""
        if self.mode == "live":
            self._scroll(text)
        elif self.mode == "lines":
            with self._mutex:
                self._stream.write(f"{time.strftime('%H:%M:%S')} {text}\n")
                self._stream.flush()

    def event(self, event: LayerEvent) -> None:
        """What happened to a layer: its lines (see :func:`~ocibuild.events.event_lines`), and on a terminal
        its live line."""
        if self.mode == "quiet":
            return
        if self.mode == "live":
            with self._mutex:
                if event.kind == "start":
                    self._layers[event.layer] = (self._clock(), "building")
                    self._start_ticker()
                elif event.kind == "step" and event.layer in self._layers:
                    self._layers[event.layer] = (self._layers[event.layer][0], event.text)
                    self._redraw()
                elif event.kind in ("done", "failed", "stopped"):
                    self._layers.pop(event.layer, None)
        self._lines(event)  # on a terminal a scrolled line, which redraws the block as it now is

    @contextmanager
    def transfer(self, what: str, done: Callable[[], int], total: int | None = None) -> Iterator[None]:
        """On a terminal, a live line while the context lasts: ``what``, the bytes ``done()`` has grown by (of
        ``total``, when known), the rate and the time left."""
        if self.mode != "live":
            yield
            return
        with self._mutex:
            token = self._next_transfer
            self._next_transfer += 1
            self._transfers[token] = _Transfer(what, self._clock(), done, done(), total)
            self._start_ticker()
            self._redraw()
        try:
            yield
        finally:
            with self._mutex:
                self._transfers.pop(token, None)
                self._redraw()

    def close(self) -> None:
        """Stop redrawing and erase the live block."""
        self._closed.set()
        if self._ticker is not None:
            self._ticker.join()
        with self._mutex:
            self._layers.clear()
            self._transfers.clear()
            self._redraw()

    # ---- the live block ----

    def _scroll(self, text: str) -> None:
        with self._mutex:
            self._stream.write(self._erase() + text + "\n" + self._block())
            self._stream.flush()

    def _redraw(self) -> None:
        if self.mode == "live":
            self._stream.write(self._erase() + self._block())
            self._stream.flush()

    def _erase(self) -> str:
        erase = f"\r\x1b[{self._drawn}A\x1b[J" if self._drawn else ""
        self._drawn = 0
        return erase

    def _block(self) -> str:
        rows = self.rows()
        self._drawn = len(rows)
        width = max(self._columns() - 1, 20)
        return "".join(row[:width] + "\n" for row in rows)

    def rows(self) -> list[str]:
        """The lines of the live block as they are now."""
        now = self._clock()
        with self._mutex:
            width = max((len(name) for name in self._layers), default=0)
            rows = [f"  {name:<{width}}  {_duration(now - started):>6}  {step}"
                    for name, (started, step) in self._layers.items()]
            rows += [_transfer_row(t, now) for t in self._transfers.values()]
        return rows

    def _start_ticker(self) -> None:
        if self._ticker is None and not self._closed.is_set():
            self._ticker = threading.Thread(target=self._tick_loop, name="ocibuild-progress", daemon=True)
            self._ticker.start()

    def _tick_loop(self) -> None:
        while not self._closed.wait(self._tick):
            with self._mutex:
                if self._drawn or self._layers or self._transfers:
                    self._redraw()


def _transfer_row(transfer: _Transfer, now: float) -> str:
    moved = max(0, transfer.done() - transfer.base)
    took = now - transfer.started
    rate = moved / took if took > 0 else 0.0
    row = f"  {transfer.what}  {_megabytes(moved)}"
    if transfer.total is not None:
        row += f" of {_megabytes(transfer.total)}"
    row += f"  {rate / 1e6:.1f} MB/s"
    if transfer.total is not None and rate > 0:
        row += f"  ETA {_duration(max(0.0, transfer.total - moved) / rate)}"
    return row


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _duration(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole}s" if whole < 60 else f"{whole // 60}m{whole % 60:02d}s"
