"""Layers built concurrently (``jobs``): each once the layers it needs are done, up to ``jobs`` at once, in plan
order with one job; the first failure (or Ctrl-C) stops the rest cleanly; each line names its layer.

The builders are the real copy builder behind a fake (``planner._build_layer`` patched) that records when each
layer starts and ends, and meets the others at barriers and events: the tests prove overlap and order by what
happened, never by how long it took. A wait's timeout only keeps a broken scheduler from hanging the suite."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import ProjectFactory
from ocibuild import planner
from ocibuild.errors import RecipeError
from ocibuild.events import LayerEvent
from ocibuild.inputs import StatCache
from ocibuild.planner import BuildResult, build, make_plan
from ocibuild.recipe.lock import Lock
from ocibuild.recipe.project import load_project
from ocibuild.store import Store
from ocibuild.store.entries import cache_tag
from ocibuild.threads import Stopped

WAIT = 30  # seconds a test waits for something that must happen, before it fails instead of hanging


def _project(make_project: ProjectFactory, needs: dict[str, list[str]]) -> Path:
    """A copy layer per name (in this order), each needing the layers ``needs`` lists."""
    layers = {name: f'kind = "copy"\nfrom = "{name}"\nto = "/{name}"\nneeds = {needs_of!r}\n'.replace("'", '"')
              for name, needs_of in needs.items()}
    return make_project(layers, files={f"{name}/file": f"{name}\n" for name in needs})


class Recorder:
    """The fake builder: ``hooks[name](ctx)`` runs before the real copy builder; starts and ends are logged."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.log: list[tuple[str, str]] = []
        self.hooks: dict[str, Callable[..., None]] = {}
        self._mutex = threading.Lock()
        real = planner._build_layer

        def fake(ctx, plan, layer, copy_tree):  # type: ignore[no-untyped-def]
            self._note("start", layer.name)
            try:
                if layer.name in self.hooks:
                    self.hooks[layer.name](ctx)
                return real(ctx, plan, layer, copy_tree)
            finally:
                self._note("end", layer.name)

        monkeypatch.setattr(planner, "_build_layer", fake)

    def _note(self, what: str, name: str) -> None:
        with self._mutex:
            self.log.append((what, name))

    def started(self) -> list[str]:
        return [name for what, name in self.log if what == "start"]


def _build(root: Path, store: Store, **kw: object) -> BuildResult:
    plan = make_plan(load_project(root), store, Lock(), StatCache(None))
    return build(plan, store, **kw)  # type: ignore[arg-type]


def _cached(store: Store, root: Path) -> list[str]:
    plan = make_plan(load_project(root), store, Lock(), StatCache(None))
    return [layer.name for layer in plan.layers if store.resolve(cache_tag(layer.name, layer.key)) is not None]


def test_independent_layers_build_at_the_same_time(make_project: ProjectFactory, store: Store,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """go and runtime both need only base: with two jobs they run at once (each waits at a barrier for the other,
    which only a concurrent build passes)."""
    root = _project(make_project, {"base": [], "go": ["base"], "runtime": ["base"]})
    recorder = Recorder(monkeypatch)
    both = threading.Barrier(2, timeout=WAIT)
    recorder.hooks = {"go": lambda ctx: both.wait(), "runtime": lambda ctx: both.wait()}
    result = _build(root, store, jobs=2)
    assert [l.status for l in result.plan.layers] == ["built"] * 3
    assert recorder.log[:1] == [("start", "base")] and recorder.log[1] == ("end", "base")


def test_a_layer_starts_only_once_every_layer_it_needs_is_done(make_project: ProjectFactory, store: Store,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """base is held until the independent tools layer has started: meanwhile go, runtime and app (which need
    base, or go and runtime) must wait although jobs are free."""
    root = _project(make_project, {"base": [], "go": ["base"], "runtime": ["base"], "app": ["go", "runtime"],
                                   "tools": []})
    recorder = Recorder(monkeypatch)
    tools_started = threading.Event()
    waited: list[bool] = []
    recorder.hooks = {"base": lambda ctx: waited.append(tools_started.wait(WAIT)),
                      "tools": lambda ctx: tools_started.set()}
    result = _build(root, store, jobs=4)
    assert waited == [True], "tools (independent) did not start while base was building"
    assert [l.status for l in result.plan.layers] == ["built"] * 5
    position = {entry: i for i, entry in enumerate(recorder.log)}
    for name, needs in {"go": ["base"], "runtime": ["base"], "app": ["go", "runtime"]}.items():
        for need in needs:
            assert position[("end", need)] < position[("start", name)], recorder.log


def test_one_job_builds_serially_in_plan_order(make_project: ProjectFactory, store: Store,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    root = _project(make_project, {"base": [], "src": [], "go": ["base"], "runtime": ["base"], "app": ["go"]})
    recorder = Recorder(monkeypatch)
    _build(root, store, jobs=1)
    order = ["base", "src", "go", "runtime", "app"]
    assert recorder.log == [(what, name) for name in order for what in ("start", "end")]


def test_a_failure_stops_the_others_and_is_the_error_reported(make_project: ProjectFactory, store: Store,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """go fails while runtime runs: runtime is stopped through its hook (as a run layer's container is killed)
    and not recorded; app (needs go) and tools (waits for a job) never start; go's error is the one raised."""
    root = _project(make_project, {"base": [], "go": ["base"], "runtime": ["base"], "app": ["go"],
                                   "tools": ["base"]})
    recorder = Recorder(monkeypatch)
    runtime_running = threading.Event()

    def go(ctx: object) -> None:
        assert runtime_running.wait(WAIT)
        raise RecipeError("layers/go/layer.toml: go is broken")

    def runtime(ctx) -> None:  # type: ignore[no-untyped-def]
        killed = threading.Event()
        with ctx.stop.hook(killed.set):
            runtime_running.set()
            assert killed.wait(WAIT), "the stop did not reach the running layer"
        ctx.stop.check()

    recorder.hooks = {"go": go, "runtime": runtime}
    events: list[LayerEvent] = []
    with pytest.raises(RecipeError, match="go is broken"):
        _build(root, store, jobs=2, events=events.append)
    assert sorted(recorder.started()) == ["base", "go", "runtime"]
    assert _cached(store, root) == ["base"]
    ends = {e.layer: (e.kind, e.text) for e in events if e.kind in ("done", "failed", "stopped")}
    assert ends == {"base": ("done", ""), "go": ("failed", "layers/go/layer.toml: go is broken"),
                    "runtime": ("stopped", "")}
    assert store.resolve("dev") is None and store.verify() == []


def test_ctrl_c_stops_the_running_layers_and_records_nothing_more(make_project: ProjectFactory, store: Store,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGINT reaches the main thread, which waits for the builders: it stops them (hooks), waits for them, and
    raises KeyboardInterrupt (the CLI's exit 130); a layer that finishes after it is not recorded."""
    root = _project(make_project, {"base": [], "go": ["base"], "runtime": ["base"], "app": ["go"]})
    recorder = Recorder(monkeypatch)
    both = threading.Barrier(2, timeout=WAIT)

    def go(ctx) -> None:  # type: ignore[no-untyped-def]
        both.wait()
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
        stopped = threading.Event()
        with ctx.stop.hook(stopped.set):
            assert stopped.wait(WAIT)
        # and returns normally: a layer done after the stop is not recorded

    def runtime(ctx) -> None:  # type: ignore[no-untyped-def]
        stopped = threading.Event()
        with ctx.stop.hook(stopped.set):
            both.wait()
            assert stopped.wait(WAIT)
        raise Stopped()

    recorder.hooks = {"go": go, "runtime": runtime}
    with pytest.raises(KeyboardInterrupt):
        _build(root, store, jobs=2)
    assert sorted(recorder.started()) == ["base", "go", "runtime"]
    assert sorted(recorder.log[-2:]) == [("end", "go"), ("end", "runtime")]  # both returned before the raise
    assert _cached(store, root) == ["base"] and store.verify() == []


def test_each_line_of_a_layer_names_it_when_layers_build_at_once(make_project: ProjectFactory, store: Store,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    root = _project(make_project, {"base": [], "go": ["base"], "runtime": ["base"]})
    recorder = Recorder(monkeypatch)
    say = {name: (lambda ctx, name=name: ctx.output(f"hello from {name}")) for name in ("go", "runtime")}
    recorder.hooks = dict(say)
    lines: list[str] = []
    _build(root, store, jobs=2, output=lines.append)
    assert "go | hello from go" in lines and "runtime | hello from runtime" in lines
    assert "building layer 'go' (copy)" in lines
    assert any(line.startswith("built layer 'runtime' (") for line in lines)

    # one job: nothing else runs beside a layer, so its lines are as its script printed them
    other = Store.open(store.root.parent / "serial")
    lines.clear()
    _build(root, other, jobs=1, output=lines.append)
    assert "hello from go" in lines and not any(" | " in line for line in lines)
    assert other.verify() == []


def test_events_name_the_layer_of_each_line_and_step(make_project: ProjectFactory, store: Store,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    root = _project(make_project, {"base": [], "go": ["base"]})
    recorder = Recorder(monkeypatch)
    recorder.hooks = {"go": lambda ctx: (ctx.step("compiling"), ctx.output("ok"))}
    events: list[LayerEvent] = []
    _build(root, store, jobs=2, events=events.append)
    assert [e for e in events if e.layer == "go"] == [
        LayerEvent("go", "start", "copy"), LayerEvent("go", "step", "compiling"), LayerEvent("go", "line", "ok"),
        LayerEvent("go", "done")]
