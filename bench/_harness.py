"""Shared helpers: run commands timed, interleave the tools run by run, print medians and ratios, save JSON."""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

BENCH = Path(__file__).resolve().parent
CACHE = BENCH / ".cache"
REPO = BENCH.parent
OCIBUILD = os.environ.get("BENCH_OCIBUILD", str(REPO / ".venv" / "bin" / "ocibuild"))
PYTHON = os.environ.get("BENCH_PYTHON", str(REPO / ".venv" / "bin" / "python"))
# ocibuild as installed by pip: bytecode compiled once and cached (under .cache/, never into src/), whatever
# PYTHONDONTWRITEBYTECODE says. NO_PYC: no bytecode cache at all, every module compiled at every start (what an
# editable install under PYTHONDONTWRITEBYTECODE=1 costs when src/ has no __pycache__).
WITH_PYC: dict[str, str | None] = {"PYTHONDONTWRITEBYTECODE": None, "PYTHONPYCACHEPREFIX": str(CACHE / "pycache")}
NO_PYC: dict[str, str | None] = {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONPYCACHEPREFIX": str(CACHE / "no-pycache")}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: Sequence[str] | str, *, cwd: Path | None = None, env: dict[str, str | None] | None = None,
        shell: bool = False) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing its output; fail loudly (with the tail of its output) when it fails."""
    full = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            full.pop(key, None)  # None unsets a variable
        else:
            full[key] = value
    proc = subprocess.run(cmd, cwd=cwd, env=full, shell=shell, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        shown = cmd if isinstance(cmd, str) else shlex.join(cmd)
        sys.exit(f"command failed ({proc.returncode}): {shown}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def timed(cmd: Sequence[str] | str, **kwargs: object) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Wall-clock seconds of one run (dirty pages are flushed first, untimed, so runs don't pay for each other)."""
    os.sync()
    start = time.perf_counter()
    proc = run(cmd, **kwargs)  # type: ignore[arg-type]
    return time.perf_counter() - start, proc


# A case is called with the run number and returns the seconds it took (it may check its own output).
Case = Callable[[int], float]


def interleave(cases: dict[str, Case], runs: int, before_run: Callable[[int], None] | None = None) -> dict[str, list[float]]:
    """``runs`` rounds; each round runs every case once, the order reversed every other round (ABBA...)."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for i in range(runs):
        if before_run:
            before_run(i)
        for name in names if i % 2 == 0 else names[::-1]:
            t = cases[name](i)
            times[name].append(t)
            log(f"  run {i + 1}/{runs} {name}: {t:.3f} s")
    return times


def fmt(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.2f} s"


def report(title: str, times: dict[str, list[float]], ratios: Sequence[tuple[str, str, str]] = (),
           throughput_bytes: int | None = None, extra: Mapping[str, object] | None = None) -> dict[str, object]:
    """Print medians (and min/max, every run), then ``(label, slow, fast)`` ratios median(slow)/median(fast).

    With ``throughput_bytes``, also MB/s per case (bytes / median). Saves everything under .cache/results/.
    """
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"\n== {title}")
    width = max(len(n) for n in times)
    for name, ts in times.items():
        speed = f"  {throughput_bytes / med[name] / 1e6:7.1f} MB/s" if throughput_bytes else ""
        runs = " ".join(f"{t:.3f}" for t in ts)
        print(f"  {name:<{width}}  median {fmt(med[name]):>9}{speed}   (n={len(ts)}, min {fmt(min(ts))}, "
              f"max {fmt(max(ts))}; runs: {runs})")
    out_ratios = {}
    for label, slow, fast in ratios:
        r = med[slow] / med[fast]
        out_ratios[label] = r
        print(f"  {label}: {r:.2f}x")
    result: dict[str, object] = {"title": title, "times": times, "medians": med, "ratios": out_ratios,
              "throughput_bytes": throughput_bytes, "extra": dict(extra or {}), "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "host": {"cpus": os.cpu_count(), "uname": os.uname().release}}
    results = CACHE / "results"
    results.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")[:60]
    (results / f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}.json").write_text(json.dumps(result, indent=2))
    sys.stdout.flush()
    return result


def write_if_changed(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def prepare_inputs() -> Path:
    """The generated trees and the base oci-archive (made once, cached); returns the base archive's path."""
    sys.path.insert(0, str(BENCH))
    import gen_trees

    gen_trees.ensure_trees()
    base = CACHE / "base.tar"
    if not base.exists():
        log("making the base image (once)")
        subprocess.run([str(BENCH / "make_base.sh")], check=True)
    return base
