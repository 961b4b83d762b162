"""moby.py --profile: where ocibuild's time went, from its timestamped stderr (per layer) and from py-spy's raw
stacks (per phase and operation of its main thread; sampled with --idle, so waiting on podman counts)."""

from __future__ import annotations

import re
from pathlib import Path

#: samples per second asked of py-spy
PYSPY_RATE = 20
#: py-spy stacks → what the time went to: (label, functions of which one must be on the stack), first match wins.
PHASES = (("merge layer", ("_merge_layer",)), ("run layers", ("_build_run_layer",)), ("copy layers", ("build_copy",
          "_copy_tree")), ("image layer", ("build_image",)), ("cache entries", ("put_cache_entry",)),
          ("assemble (conflict check, image)", ("assemble",)), ("plan (keys, input trees)", ("load_plan", "make_plan")),
          ("ocibuild run", ("run_command",)))
OPERATIONS = (("stage the stack into podman", ("staged", "Engine.load_from_layout")),
              ("remove the container", ("Engine.remove_container",)),
              ("the compile step (when ocibuild stays its parent)", ("Engine.supervise",)),
              ("the script in its container", ("Engine.run",)), ("podman diff", ("Engine.diff",)),
              ("capture: mount, read the changes, write the blob", ("capture_container",)),
              ("read layers (listings, bookkeeping files)",
               ("layer_listing", "layer_record", "_holds_bookkeeping", "_merged_texts")),
              ("find conflicts", ("find_conflicts",)), ("walk and hash trees", ("walk_tree", "tree_digest")),
              ("write a layer", ("write_layer", "write_entries")), ("import an archive", ("build_image",)))


def summarise_pyspy(raw: Path) -> list[tuple[str, str, float]]:
    """Seconds per (phase, operation) of the main thread of the main process, from py-spy's raw output (with
    --idle, so waiting on podman or a subprocess counts)."""
    counts: dict[tuple[str, str], int] = {}
    main_pid = None
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if "__main__.py" not in stack or (main_pid is not None and frames[0] != main_pid):
            continue
        main_pid = main_pid or frames[0]
        names = {f.split(" (", 1)[0] for f in frames}  # methods are qualified: Engine.run
        phase = next((label for label, funcs in PHASES if names & set(funcs)), "other")
        if "dispatch" not in names:
            phase = "start-up (imports, arguments)"
        op = next((label for label, funcs in OPERATIONS if names & set(funcs)), "-")
        counts[(phase, op)] = counts.get((phase, op), 0) + int(count)
        total += int(count)
    rate = PYSPY_RATE
    return sorted(((p, o, n / rate) for (p, o), n in counts.items()), key=lambda x: -x[2])


def summarise_log(path: Path) -> list[tuple[str, float, float, float]]:
    """Per layer, from a timestamped ocibuild log: (layer, seconds before its script's first line — staging and
    container start —, seconds of script output, seconds after its last line until the next layer — diff, capture,
    cache entry)."""
    rows: list[tuple[str, float, float, float]] = []
    marks: list[tuple[str, float, list[float]]] = []
    end = 0.0
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line[:9].strip():
            continue
        try:
            t = float(line[:9])
        except ValueError:
            continue
        text = line[10:]
        if text.startswith("# exit"):
            end = t
            break
        match = re.match(r"building layer '([^']+)'|merging package bookkeeping", text)
        if match:
            marks.append((match.group(1) or "ocibuild-merge", t, []))
        elif marks:
            marks[-1][2].append(t)
    for i, (name, t, lines) in enumerate(marks):
        nxt = marks[i + 1][1] if i + 1 < len(marks) else end
        if lines:
            rows.append((name, lines[0] - t, lines[-1] - lines[0], nxt - lines[-1]))
        else:
            rows.append((name, 0.0, 0.0, nxt - t))
    return rows
