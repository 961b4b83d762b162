"""Progress as a person follows it: ``--jobs`` and ``-q`` on the command line; off a terminal, timestamped lines
on stderr (nothing with -q); on a terminal, a live block of one line per running layer or transfer below the
scrolling output."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from conftest import ProjectFactory
from ocibuild import cli
from ocibuild.cli.dispatch import parser
from ocibuild.cli.progress import Progress
from ocibuild.events import LayerEvent

TIMESTAMPED = re.compile(r"\d\d:\d\d:\d\d \S")


def _project(make_project: ProjectFactory) -> Path:
    return make_project({"base": 'kind = "copy"\nfrom = "base"\nto = "/"\n',
                         "go": 'kind = "copy"\nfrom = "go"\nto = "/go"\nneeds = ["base"]\n',
                         "src": 'kind = "copy"\nfrom = "src"\nto = "/src"\n'},
                        files={"base/etc/motd": "hello\n", "go/VERSION": "go1.19\n", "src/main.go": "package main\n"})


# ---- the options ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["build", "run", "shell"])
def test_jobs_counts_layers_of_the_commands_that_build(command: str) -> None:
    assert parser().parse_args([command, "--jobs", "3"]).jobs == 3
    assert parser().parse_args([command]).jobs is None  # by the machine's cores and memory, when building


@pytest.mark.parametrize("value", ["0", "65", "many"])
def test_jobs_out_of_range_is_a_usage_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        parser().parse_args(["build", "--jobs", value])
    assert exit.value.code == 2 and "--jobs" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["-q", "build"], ["build", "-q"], ["--quiet", "pull-cache"], ["push-cache", "-q"]])
def test_quiet_on_either_side_of_the_command(argv: list[str]) -> None:
    assert parser().parse_args(argv).quiet is True
    assert parser().parse_args([a for a in argv if a not in ("-q", "--quiet")]).quiet is False


# ---- off a terminal -------------------------------------------------------------------------------------------


def test_off_a_terminal_progress_is_timestamped_lines_on_stderr(make_project: ProjectFactory, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    root = _project(make_project)
    assert cli.main(["build", "--json", "--jobs", "2", "-C", str(root), "--store", str(tmp_path / "s")]) == 0
    captured = capsys.readouterr()
    assert [l["status"] for l in json.loads(captured.out)["layers"]] == ["built"] * 3
    lines = captured.err.splitlines()
    assert lines and all(TIMESTAMPED.match(line) for line in lines), captured.err
    assert "\x1b" not in captured.err
    assert any(line.endswith(" building layer 'go' (copy)") for line in lines)
    assert any(re.search(r" built layer 'go' \(\d+\.\d s\)$", line) for line in lines)


def test_quiet_prints_only_results_and_errors(make_project: ProjectFactory, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    root = _project(make_project)
    store = str(tmp_path / "s")
    assert cli.main(["-q", "build", "-C", str(root), "--store", store]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.startswith("dev sha256:")
    (root / "layers/go/layer.toml").write_text('kind = "copy"\nfrom = "nowhere"\nto = "/go"\n')
    assert cli.main(["build", "-q", "-C", str(root), "--store", store]) == 1
    assert capsys.readouterr().err.startswith("error: ")


# ---- on a terminal --------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _live(clock: Clock) -> tuple[Progress, io.StringIO]:
    out = io.StringIO()
    return Progress(out, "live", prefix=True, clock=clock, columns=lambda: 80, tick=3600), out


def test_live_block_has_a_line_per_running_layer_with_step_and_elapsed_time() -> None:
    clock = Clock()
    progress, out = _live(clock)
    progress.event(LayerEvent("go", "start", "run"))
    progress.event(LayerEvent("runtime-dev", "start", "run"))
    progress.event(LayerEvent("go", "step", "running the script"))
    clock.now += 42
    assert progress.rows() == ["  go              42s  running the script", "  runtime-dev     42s  building"]
    clock.now += 60
    progress.event(LayerEvent("runtime-dev", "done"))
    assert progress.rows() == ["  go   1m42s  running the script"]
    progress.close()
    assert progress.rows() == []
    assert out.getvalue().endswith("\x1b[J")  # the block is erased when the command ends


def test_live_output_scrolls_above_the_block() -> None:
    clock = Clock()
    progress, out = _live(clock)
    progress.event(LayerEvent("go", "start", "run"))
    start = len(out.getvalue())
    progress.event(LayerEvent("go", "line", "Setting up golang (2:1.19)"))
    written = out.getvalue()[start:]
    # the block (one line) is erased, the line written, the block drawn again below it
    assert written == "\r\x1b[1A\x1b[J" + "go | Setting up golang (2:1.19)\n" + "  go      0s  building\n"
    progress.close()


def test_live_transfer_line_shows_bytes_rate_and_time_left() -> None:
    clock = Clock()
    progress, _ = _live(clock)
    moved = [7_000_000]  # what the counter held before: not part of this transfer
    with progress.transfer("pulling from r/cache", lambda: moved[0], 100_000_000):
        clock.now += 10
        moved[0] += 50_000_000
        assert progress.rows() == ["  pulling from r/cache  50.0 MB of 100.0 MB  5.0 MB/s  ETA 10s"]
    assert progress.rows() == []
    progress.close()
