"""What a build tells its caller while it runs: a :class:`LayerEvent` for each thing that happens to a layer being
built (several layers build at once, so each event names its layer), and :func:`event_lines`, their plain lines
for a log. Pure data and a formatter: the CLI decides where they go (a live display on a terminal, lines on
stderr otherwise)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Output = Callable[[str], None]

#: start (text: the layer's kind), step (text: what it does now, "running the script"), line (text: a progress
#: line or a line of its script's output), done (its cache entry is recorded), failed (text: the error), stopped
#: (another layer failed, or the user interrupted).
EventKind = Literal["start", "step", "line", "done", "failed", "stopped"]


@dataclass(frozen=True)
class LayerEvent:
    layer: str
    kind: EventKind
    text: str = ""


Events = Callable[[LayerEvent], None]


def event_lines(output: Output, *, prefix: bool, clock: Callable[[], float] = time.monotonic) -> Events:
    """Layer events as the plain lines of a log, to ``output``: "building layer 'go' (run)" when one starts, its
    lines (with ``prefix``, when layers build at once, each as "go | line"), and how it ended with the time it took.
    Steps make no line: a log's timestamps show them."""
    started: dict[str, float] = {}

    def render(event: LayerEvent) -> None:
        name = event.layer
        if event.kind == "start":
            started[name] = clock()
            output(f"building layer '{name}' ({event.text})")
        elif event.kind == "line":
            output(f"{name} | {event.text}" if prefix else event.text)
        elif event.kind != "step":
            took = clock() - started.pop(name, clock())
            ended = {"done": f"built layer '{name}'", "failed": f"layer '{name}' failed",
                     "stopped": f"layer '{name}' stopped"}[event.kind]
            output(f"{ended} ({took:.1f} s)")

    return render
