"""Container engines (podman, nerdctl) through python-on-whales — the only module that imports it.

Work-arounds for python-on-whales 0.81 with podman 4.3, so that users see real error messages:
global flags (``[engine] args`` from the user's config) go into ``client_call``; every run passes
``pull="never"`` (podman would otherwise try a registry for seconds); ``image.pull`` of an ``oci:`` reference
fails to inspect what it pulled, so pulls go through ``utils.run``; non-streaming calls lose stderr and raise
``UnicodeDecodeError`` on non-UTF-8 output, so output that matters is streamed and decoded with replacement,
and every ``DockerException`` becomes an :class:`EngineError` carrying the engine's stderr.

nerdctl cannot be installed on the machines we test on; its command lines are checked by the tests against a
recording stand-in. It lacks ``diff``/``mount``, so run layers need podman; ``ocibuild run`` works with both.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import stat
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING, Any

from .errors import EngineError, StepFailed

if TYPE_CHECKING:
    from python_on_whales.exceptions import DockerException

log = logging.getLogger(__name__)

ENGINES = ("podman", "nerdctl")
Output = Callable[[str], None]


@dataclass(frozen=True)
class BindMount:
    host: Path
    container: str
    read_only: bool = False

    def to_arg(self) -> str:
        return f"{self.host}:{self.container}" + (":ro" if self.read_only else "")


def _whales() -> Any:
    """python-on-whales, imported on first use: it pulls in pydantic (~0.5 s), which a no-op build must not pay."""
    import python_on_whales
    import python_on_whales.utils

    return python_on_whales


def whales_run(args: list[str], **kwargs: Any) -> str:
    return str(_whales().utils.run(args, **kwargs) or "")


def _docker_exception() -> type[DockerException]:
    from python_on_whales.exceptions import DockerException

    return DockerException


def _stderr_of(err: DockerException) -> str:
    text = err.stderr or ""
    return " ".join(line.strip() for line in text.strip().splitlines()[-3:]) or f"exit code {err.return_code}"


_NAME_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")


def podman_layout_path(layout: Path) -> Path:
    """A path podman 4.3 accepts in ``oci:PATH:TAG``. It names the pulled image after PATH and fails on any
    component that is not valid in an image name — ``~/.cache``, the default store, for one. Such a layout is
    reached through a symlink in a private directory of ours (0700, owned by us, checked) instead."""
    if all(_NAME_COMPONENT.fullmatch(part) for part in layout.parts[1:]):
        return layout
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime and os.path.isabs(runtime) else Path("/run" if os.geteuid() == 0 else "/tmp")
    private = base / f"ocibuild-{os.geteuid()}"
    try:
        private.mkdir(mode=0o700, exist_ok=True)
        st = private.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise EngineError(f"{private} is not a private directory of this user",
                              f"remove {private}; ocibuild makes it again")
        alias = private / hashlib.sha256(str(layout).encode()).hexdigest()[:16]
        try:
            if os.readlink(alias) == str(layout):
                return alias
        except OSError:
            pass
        tmp = private / f"{alias.name}.{os.getpid()}.{threading.get_ident()}.tmp"  # layers stage at once
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(layout)
        os.replace(tmp, alias)
    except OSError as err:
        raise EngineError(f"cannot make a podman-readable path for {layout}: {err}",
                          "set XDG_RUNTIME_DIR to a writable directory, or use a --store path of lowercase names") from None
    if not all(_NAME_COMPONENT.fullmatch(part) for part in alias.parts[1:]):
        raise EngineError(f"{alias}: podman cannot name an image pulled from this path",
                          "use a --store path of lowercase names, or an XDG_RUNTIME_DIR like /run/user/UID")
    return alias


class Engine:
    """One container engine, with the user's global flags."""

    def __init__(self, name: str, args: Sequence[str] = (), *, executable: str | None = None) -> None:
        if name not in ENGINES:
            raise EngineError(f"unknown engine '{name}'", "use podman or nerdctl (or auto)")
        self.name = name
        self.executable = executable or shutil.which(name) or name
        self.args = tuple(args)
        self._client = _whales().DockerClient(client_call=[self.executable, *self.args],
                                              client_type="podman" if name == "podman" else "nerdctl")
        self._error = _docker_exception()

    @classmethod
    def detect(cls, choice: str = "auto", args: Sequence[str] = ()) -> Engine:
        """The engine asked for, or with ``auto`` podman if installed, else nerdctl."""
        names = ENGINES if choice == "auto" else (choice,)
        for name in names:
            path = shutil.which(name)
            if path is not None:
                return cls(name, args, executable=path)
        raise EngineError(
            f"no container engine found ({' or '.join(names)} is not on PATH)",
            "install podman (apt-get install podman runc uidmap), or run `ocibuild doctor`",
        )

    @property
    def cmd(self) -> list[str]:
        return [str(part) for part in self._client.client_config.docker_cmd]

    def _call(self, *args: str, what: str) -> str:
        try:
            out = whales_run([*self.cmd, *args])
        except self._error as err:
            raise EngineError(f"{self.name} {what} failed: {_stderr_of(err)}", self._hint()) from None
        except UnicodeDecodeError:
            raise EngineError(f"{self.name} {what} printed output that is not UTF-8", self._hint()) from None
        except FileNotFoundError:
            raise EngineError(f"{self.executable} is not installed", "install podman, or run `ocibuild doctor`") from None
        return str(out or "")

    def _hint(self) -> str:
        return "run `ocibuild doctor` to check the engine; host-specific flags go in [engine] args of the config"

    # ---- images ----

    def has_image(self, image_id: str) -> bool:
        try:
            return bool(self._client.image.exists(image_id))
        except self._error:
            return False

    def load_from_layout(self, layout: Path, tag: str, image_id: str, archive: Callable[[], Path]) -> str:
        """Make the image ``tag`` of the OCI layout ``layout`` available; returns the engine's image id.

        podman copies from the layout and skips layers it already holds; nerdctl can only load an archive,
        made by ``archive()`` when needed. Nothing moves when the engine already has ``image_id``."""
        if self.has_image(image_id):
            return image_id
        if self.name == "podman":
            source = f"oci:{podman_layout_path(layout)}:{tag}"
            out = self._call("pull", "--quiet", source, what=f"loading image {tag}")
            return out.strip().splitlines()[-1] if out.strip() else image_id
        self._call("load", "--input", str(archive()), what=f"loading image {tag}")
        return image_id

    # ---- containers ----

    def run(
        self,
        image: str,
        command: Sequence[str],
        *,
        name: str | None = None,
        mounts: Sequence[BindMount] = (),
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        network: bool = True,
        remove: bool = False,
        output: Output,
        what: str,
        tail_lines: int = 20,
    ) -> None:
        """Run ``command`` in a new container, streaming its output lines to ``output``.

        A non-zero exit raises :class:`StepFailed` naming ``what``, the exit code and the last lines."""
        tail: list[str] = []
        try:
            stream = self._client.run(
                image,
                list(command),
                name=name,
                volumes=[(str(m.host), m.container, "ro" if m.read_only else "rw") for m in mounts],
                envs=dict(env or {}),
                workdir=workdir,
                networks=[] if network else ["none"],
                remove=remove,
                pull="never",
                stream=True,
            )
            assert not isinstance(stream, str)
            for _source, raw in stream:
                text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
                for line in text.rstrip("\n").split("\n"):
                    output(line)
                    tail = (tail + [line])[-tail_lines:]
        except self._error as err:
            if err.return_code == 125:  # the engine's own failure, whose message arrived on the stream
                detail = " ".join(line.strip() for line in tail[-3:]) or _stderr_of(err)
                raise EngineError(f"{what}: {self.name} could not start the container: {detail}",
                                  self._hint()) from None
            raise StepFailed(f"{what}: exited {err.return_code}; last {len(tail)} lines follow",
                             "fix the script (the full log is in the store's ocibuild/logs)",
                             exit_code=err.return_code, tail="\n".join(tail)) from None
        except FileNotFoundError:
            raise EngineError(f"{self.executable} is not installed", "install podman, or run `ocibuild doctor`") from None

    def run_attached(self, image: str, command: Sequence[str], *, mounts: Sequence[BindMount],
                     env: Mapping[str, str | None], workdir: str | None, interactive: bool, network: bool = True,
                     privileged: bool = False, tty: bool | None = None) -> int:
        """The compile step (and ``ocibuild shell``): the container's output straight on our terminal; returns
        its exit code. ``interactive`` passes our stdin (``-i``); ``tty`` allocates a terminal (``-t``; None:
        when interactive and both stdin and stdout are terminals). An ``env`` value of None passes the variable
        by name (``-e NAME``): the engine reads it from our environment, so a secret is not on its command line."""
        if privileged:
            self.check_privileged()
        if tty is None:
            tty = interactive and os.isatty(0) and os.isatty(1)
        argv = ["run", "--rm", "--pull=never"] + ([] if network else ["--network=none"])
        argv += ["--privileged"] if privileged else []
        argv += (["-i"] if interactive else []) + (["-t"] if tty else [])
        for m in mounts:
            argv += ["-v", m.to_arg()]
        for key, value in env.items():
            argv += ["-e", key if value is None else f"{key}={value}"]
        if workdir:
            argv += ["-w", workdir]
        argv += [image, *command]
        try:
            whales_run([*self.cmd, *argv], capture_stdout=False, capture_stderr=False)
        except self._error as err:
            return int(err.return_code)
        except FileNotFoundError:
            raise EngineError(f"{self.executable} is not installed", "install podman, or run `ocibuild doctor`") from None
        return 0

    def diff(self, container: str) -> dict[str, str]:
        """Paths the container changed: ``{"/path": "A" | "C" | "D"}``."""
        if self.name != "podman":
            raise EngineError(f"run layers need podman: {self.name} has no container diff",
                              "install podman, or set engine = \"podman\" in [run]")
        try:
            changes = self._client.container.diff(container)
        except self._error as err:
            raise EngineError(f"{self.name} diff {container} failed: {_stderr_of(err)}", self._hint()) from None
        except UnicodeDecodeError:
            raise EngineError(f"{self.name} diff {container}: a changed path is not UTF-8",
                              "make the script create only UTF-8 file names") from None
        return dict(changes)

    @contextmanager
    def mounted(self, container: str) -> Iterator[Path]:
        """The container's root filesystem as a host path while the context lasts."""
        path = Path(self._call("mount", container, what=f"mount {container}").strip())
        try:
            yield path
        finally:
            try:
                self._call("unmount", container, what=f"unmount {container}")
            except EngineError as err:
                log.warning("%s", err)

    @property
    def rootless(self) -> bool:
        """Containers run in a user namespace of an ordinary user (rootless podman or nerdctl, or already
        inside ``podman unshare``): their root has no more rights than that user."""
        return os.geteuid() != 0 or "_CONTAINERS_USERNS_CONFIGURED" in os.environ

    def check_privileged(self) -> None:
        """Raise :class:`EngineError` when ``--privileged`` cannot give what it promises: rootless."""
        if self.rootless:
            raise EngineError(f"--privileged cannot work with rootless {self.name}: the container gets no more "
                              "rights than your own user",
                              "run this step as root (sudo ocibuild …), or drop --privileged / [run] privileged")

    def needs_unshare(self) -> bool:
        """Rootless podman: container files are readable only inside its user namespace."""
        return self.name == "podman" and os.geteuid() != 0 and "_CONTAINERS_USERNS_CONFIGURED" not in os.environ

    def unshare(self, argv: Sequence[str], stdin: bytes, *, what: str) -> str:
        """Run ``argv`` inside podman's user namespace (``podman unshare``), feeding it ``stdin``."""
        try:
            return whales_run([*self.cmd, "unshare", *argv], input=stdin)
        except self._error as err:
            raise EngineError(f"{what} failed: {_stderr_of(err)}", self._hint()) from None

    def remove_container(self, container: str) -> None:
        try:
            self._client.container.remove(container, force=True)
        except self._error as err:
            if "no such container" not in (err.stderr or "").lower():
                log.warning("could not remove container %s: %s", container, _stderr_of(err))

    def kill_container(self, container: str) -> None:
        """SIGKILL the container's processes (a build stopping: its script has nothing to save), if it runs."""
        try:
            self._client.container.kill(container)
        except self._error as err:
            log.debug("could not kill container %s: %s", container, _stderr_of(err))

    def container_exists(self, container: str) -> bool:
        try:
            return bool(self._client.container.exists(container))
        except self._error:
            return False

    def info(self) -> str:
        return self._call("info", what="info")

    def version(self) -> str:
        return self._call("--version", what="--version").strip()
