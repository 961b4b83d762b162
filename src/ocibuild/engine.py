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
import json
import logging
import os
import re
import shutil
import signal
import stat
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from typing import TYPE_CHECKING, Any, NoReturn

from .errors import EngineError, StepFailed

if TYPE_CHECKING:
    from python_on_whales.exceptions import DockerException

log = logging.getLogger(__name__)

ENGINES = ("podman", "nerdctl")
#: Signals Python starts ignoring, which a program it starts should get back at their default.
_PYTHON_IGNORES = {signal.SIGPIPE, signal.SIGXFSZ}
#: Signals :meth:`Engine.supervise` passes on to the engine when they were sent to ocibuild alone.
_FORWARDED = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT}
#: siginfo's si_code of a signal the kernel sent (a terminal's ^C, ^\, hang-up: the whole process group got it).
_SI_KERNEL = 0x80
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


def created_mount_points(mounts: Sequence[BindMount]) -> list[Path]:
    """The host paths the engine will create for ``mounts``: a mount whose container path lies inside another
    bind-mounted directory needs its mount point in that directory, and the runtime makes a missing one there —
    on the host (an empty directory, or an empty file for a file). Outermost first, for
    :func:`remove_mount_points` after the container."""
    created: list[Path] = []
    for mount in mounts:
        target = PurePosixPath(mount.container)
        around = [m for m in mounts if PurePosixPath(m.container) in target.parents]
        if not around:
            continue
        parent = max(around, key=lambda m: len(PurePosixPath(m.container).parts))
        path = parent.host
        for part in target.relative_to(PurePosixPath(parent.container)).parts:
            path = path / part
            if path not in created and not os.path.lexists(path):
                created.append(path)
    return sorted(created, key=lambda p: len(p.parts))


def remove_mount_points(paths: Sequence[Path]) -> None:
    """Remove what :func:`created_mount_points` named, innermost first, where it is still an empty directory or
    an empty file (something written there since stays)."""
    for path in reversed(paths):
        try:
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            elif path.is_file() and not path.is_symlink() and path.stat().st_size == 0:
                path.unlink()
        except OSError as err:
            log.warning("left the mount point %s: %s", path, err.strerror)


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
        self._whales_client: Any = None
        self._removals: list[threading.Thread] = []  # containers being removed in the background
        self._removals_lock = threading.Lock()

    @property
    def _client(self) -> Any:
        """python-on-whales' client, made on first use: management calls only (see the module docstring)."""
        if self._whales_client is None:
            self._whales_client = _whales().DockerClient(client_call=self.cmd,
                                                         client_type="podman" if self.name == "podman" else "nerdctl")
        return self._whales_client

    @property
    def _error(self) -> type[DockerException]:
        return _docker_exception()

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
        """The engine's command line up to its subcommand: the executable and the user's global flags."""
        return [self.executable, *self.args]

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

    def has_image_later(self, image_id: str) -> Callable[[], bool]:
        """Start asking whether the engine holds ``image_id`` and return the function that waits for the answer:
        the question (podman's start-up, 0.04–0.08 s) runs while ocibuild plans. No python-on-whales: this is on the
        path of a no-op ``ocibuild run``."""
        import subprocess

        question = ["image", "exists", image_id] if self.name == "podman" else ["image", "inspect", image_id]
        try:
            process = subprocess.Popen([*self.cmd, *question], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
        except OSError:
            return lambda: False
        return lambda: process.wait() == 0

    def has_image(self, image_id: str) -> bool:
        return self.has_image_later(image_id)()

    def load_from_layout(self, layout: Path, tag: str, image_id: str, name: str, archive: Callable[[], Path], *,
                         present: bool | None = None) -> str:
        """Make the image ``tag`` of the OCI layout ``layout`` available as ``name``; returns the engine's image id.

        podman copies from the layout and skips layers it already holds; it names an image pulled from a layout
        after the layout's path, a name dropped here. nerdctl can only load an archive, made by ``archive()``
        (named ``name``) when needed. Nothing moves when the engine already has ``image_id`` (``present``: known
        already, else asked)."""
        if present is None:
            present = self.has_image(image_id)
        if not present and self.name == "podman":
            alias = podman_layout_path(layout)
            out = self._call("pull", "--quiet", f"oci:{alias}:{tag}", what=f"loading image {tag}")
            image_id = out.strip().splitlines()[-1] if out.strip() else image_id
            by_path = [n for n in self.image_names(image_id) or () if n.startswith(f"localhost{alias}:")]
            if by_path:
                self.untag(image_id, by_path)
        elif not present:
            self._call("load", "--input", str(archive()), what=f"loading image {tag}")
            return image_id
        self._call("tag", image_id, name, what=f"tag {image_id[:12]} {name}")
        return image_id

    def image_names(self, image_id: str) -> list[str] | None:
        """The names of image ``image_id``; None when the engine does not hold it."""
        try:
            out = whales_run([*self.cmd, "image", "inspect", "--format", "{{json .RepoTags}}", image_id])
        except self._error as err:
            if "image not known" in (err.stderr or "") or "no such image" in (err.stderr or "").lower():
                return None
            raise EngineError(f"{self.name} image inspect {image_id[:12]} failed: {_stderr_of(err)}",
                              self._hint()) from None
        except FileNotFoundError:
            raise EngineError(f"{self.executable} is not installed", "install podman, or run `ocibuild doctor`") from None
        names = json.loads(str(out).strip().splitlines()[-1] if str(out).strip() else "null")
        return [str(n) for n in names or ()]

    def images_named(self, repository: str) -> dict[str, list[str]]:
        """The images with a name in ``repository``: id → every name of it."""
        out = self._call("images", "--format", "json", "--filter", f"reference={repository}",
                         what=f"images {repository}")
        return {str(i["Id"]): [str(n) for n in i.get("Names") or ()] for i in json.loads(out or "[]")}

    def untag(self, image_id: str, names: Sequence[str]) -> None:
        """Take ``names`` off image ``image_id``. A name already gone is no error: layers staged at once load the
        same stack and each drops the name podman gave it."""
        for name in names:
            try:
                whales_run([*self.cmd, "untag", image_id, name])
            except self._error as err:
                if "tag not known" not in (err.stderr or "") and "image not known" not in (err.stderr or ""):
                    raise EngineError(f"{self.name} untag {image_id[:12]} {name} failed: {_stderr_of(err)}",
                                      self._hint()) from None
            except FileNotFoundError:
                raise EngineError(f"{self.executable} is not installed",
                                  "install podman, or run `ocibuild doctor`") from None

    def remove_image(self, image_id: str, names: Sequence[str]) -> bool:
        """Remove image ``image_id``, first taking off ``names`` (all of its names), never by force: False when a
        container still uses it (then it stays, without those names)."""
        if names:
            self.untag(image_id, names)
        try:
            whales_run([*self.cmd, "rmi", image_id])
        except self._error as err:
            log.info("%s keeps image %s: %s", self.name, image_id[:12], _stderr_of(err))
            return False
        return True

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

    def run_command_line(self, image: str, command: Sequence[str], *, mounts: Sequence[BindMount],
                         env: Mapping[str, str | None], workdir: str | None, interactive: bool, network: bool = True,
                         privileged: bool = False, tty: bool | None = None) -> list[str]:
        """The compile step's (and ``ocibuild shell``'s) command line, for :meth:`hand_over` or :meth:`supervise`.
        ``interactive`` passes our stdin (``-i``); ``tty`` allocates a terminal (``-t``; None: when interactive and
        both stdin and stdout are terminals). An ``env`` value of None passes the variable by name (``-e NAME``):
        the engine reads it from our environment, so a secret is not on its command line."""
        if privileged:
            self.check_privileged()
        if tty is None:
            tty = interactive and os.isatty(0) and os.isatty(1)
        argv = [*self.cmd, "run", "--rm", "--pull=never"] + ([] if network else ["--network=none"])
        argv += ["--privileged"] if privileged else []
        argv += (["-i"] if interactive else []) + (["-t"] if tty else [])
        for m in mounts:
            argv += ["-v", m.to_arg()]
        for key, value in env.items():
            argv += ["-e", key if value is None else f"{key}={value}"]
        if workdir:
            argv += ["-w", workdir]
        return [*argv, image, *command]

    def hand_over(self, argv: Sequence[str]) -> NoReturn:
        """Become the engine running ``argv`` (exec): its signals, terminal and exit code are then the engine's
        own, and ocibuild costs nothing while the container runs. Signals Python ignores (SIGPIPE, SIGXFSZ) are
        given back their default first, as a shell would start the engine."""
        sys.stdout.flush()
        sys.stderr.flush()
        for sig in _PYTHON_IGNORES:
            signal.signal(sig, signal.SIG_DFL)
        try:
            os.execvp(argv[0], list(argv))
        except OSError as err:
            for sig in _PYTHON_IGNORES:
                signal.signal(sig, signal.SIG_IGN)
            raise EngineError(f"cannot start {argv[0]}: {err.strerror}", "install podman, or run `ocibuild doctor`") \
                from None

    def supervise(self, argv: Sequence[str], after: Callable[[], None]) -> int:
        """Run ``argv`` as our child, then ``after()``; the child's exit code (128 + N when signal N ended it).
        For when something must happen after the container (see :func:`created_mount_points`); otherwise
        :meth:`hand_over`. The child gets the terminal as an exec'd engine would: it stays in our process group,
        so a terminal's ^C, ^\\ or hang-up reaches it directly; the same signals sent to us alone (``kill PID``)
        are forwarded. They are blocked here and taken with sigtimedwait, so none is lost between the spawn and
        the wait, and none ends ocibuild before ``after()``."""
        waited = {*_FORWARDED, signal.SIGCHLD}
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, waited)
        try:
            try:
                pid = os.posix_spawnp(argv[0], list(argv), os.environ, setsigmask=previous,
                                      setsigdef=_PYTHON_IGNORES)
            except OSError as err:
                raise EngineError(f"cannot start {argv[0]}: {err.strerror}",
                                  "install podman, or run `ocibuild doctor`") from None
            try:
                while True:
                    info = signal.sigtimedwait(waited, 1.0)
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done:
                        break
                    if info is not None and info.si_signo in _FORWARDED and info.si_code != _SI_KERNEL:
                        os.kill(pid, info.si_signo)  # sent to us alone; a terminal's reached the child already
            finally:
                after()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        code = os.waitstatus_to_exitcode(status)
        return 128 - code if code < 0 else code

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

    def remove_container_later(self, container: str) -> None:
        """Remove a finished container on a thread of its own: deleting the files of a container that installed
        packages takes seconds (14.8 s of a cold build of Docker's project), which the layers waiting for this one
        need not wait for. :meth:`wait_removals` waits for them."""
        thread = threading.Thread(target=self.remove_container, args=(container,), name=f"remove-{container}")
        with self._removals_lock:
            self._removals.append(thread)
        thread.start()

    def wait_removals(self) -> None:
        """Wait until every container given to :meth:`remove_container_later` is removed."""
        with self._removals_lock:
            threads, self._removals = self._removals, []
        for thread in threads:
            thread.join()

    def kill_container(self, container: str) -> None:
        """SIGKILL the container's processes (a build stopping: its script has nothing to save), if it runs."""
        try:
            self._client.container.kill(container)
        except self._error as err:
            log.debug("could not kill container %s: %s", container, _stderr_of(err))

    def stopped_containers(self, prefix: str) -> list[str]:
        """The names of the containers whose name starts with ``prefix`` that are not running (created, exited)."""
        out = self._call("ps", "--all", "--format", "json", "--filter", f"name=^{re.escape(prefix)}",
                         what=f"ps {prefix}")
        return [str(name) for c in json.loads(out or "[]") if str(c.get("State", "")).lower() in ("created", "exited")
                for name in c.get("Names") or () if str(name).startswith(prefix)]

    def container_exists(self, container: str) -> bool:
        try:
            return bool(self._client.container.exists(container))
        except self._error:
            return False

    def info(self) -> str:
        return self._call("info", what="info")

    def version(self) -> str:
        return self._call("--version", what="--version").strip()
