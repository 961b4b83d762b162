"""``bootstrap`` layers: a Debian root filesystem made by mmdebstrap from the archive state the lock records."""

from __future__ import annotations

import os
import platform as host_platform
import subprocess
from collections.abc import Sequence
from pathlib import Path

from ..tar import write
from ..errors import EngineError, LockError, OcibuildError, RecipeError, StepFailed
from ..net.download import fetch_bytes
from ..oci import LayerBlob, Digest, Platform
from ..recipe.key import Input
from ..recipe.project import LayerRecipe
from ..threads import Stop
from .context import BuildContext, Output, temp_file, write_entries


# GOARCH names (the image's [image] architecture) -> (Debian architecture, qemu-user binfmt name, uname -m names)
_ARCHITECTURES = {
    "amd64": ("amd64", "x86_64", ("x86_64",)),
    "arm64": ("arm64", "aarch64", ("aarch64", "arm64")),
    "arm": ("armhf", "arm", ("armv7l", "armv8l")),
    "386": ("i386", "i386", ("i386", "i686")),
    "ppc64le": ("ppc64el", "ppc64le", ("ppc64le",)),
    "s390x": ("s390x", "s390x", ("s390x",)),
    "riscv64": ("riscv64", "riscv64", ("riscv64",)),
    "mips64le": ("mips64el", "mips64el", ("mips64",)),
}
_BINFMT = Path("/proc/sys/fs/binfmt_misc")


def debian_architecture(platform: Platform, what: str, *, machine: str | None = None,
                        binfmt: Path = _BINFMT) -> str:
    """The Debian architecture mmdebstrap builds for ``platform``; an error when this host cannot run its
    binaries (maintainer scripts run during the bootstrap): neither native nor registered with binfmt_misc."""
    known = _ARCHITECTURES.get(platform.architecture)
    if known is None:
        raise RecipeError(f"{what}: [image] architecture '{platform.architecture}' has no Debian port ocibuild knows",
                          f"use one of {', '.join(sorted(_ARCHITECTURES))}")
    debian, qemu, machines = known
    machine = host_platform.machine() if machine is None else machine
    if machine in machines or (platform.architecture == "386" and machine == "x86_64"):
        return debian
    try:
        enabled = (binfmt / f"qemu-{qemu}").read_text().splitlines()[:1] == ["enabled"]
    except OSError:
        enabled = False
    if not enabled:
        raise EngineError(f"{what}: this {machine} host cannot build {debian} (architecture "
                          f"'{platform.architecture}'): no binfmt_misc handler qemu-{qemu} is registered",
                          "install qemu-user-static and binfmt-support (apt-get install qemu-user-static), or build "
                          "this layer on a host of that architecture and share it through the cache")
    return debian


def build_bootstrap(ctx: BuildContext, layer: LayerRecipe, locked: Input, platform: Platform) -> list[LayerBlob]:
    """``bootstrap``: a root filesystem by mmdebstrap for ``platform``'s architecture, reproducible via
    SOURCE_DATE_EPOCH; owners kept. ``locked`` is the suite's InRelease as ocibuild.lock records it; the archive
    must still be in that state."""
    if ctx.offline:  # refused before anything reaches the network
        raise OcibuildError(f"layer '{layer.name}': a bootstrap layer downloads packages, which --offline forbids",
                            "build it on a connected machine and bring it with `ocibuild export`/`import`")
    architecture = debian_architecture(platform, f"layer '{layer.name}'")
    check_release(layer, locked)
    mirror, suite = layer.str_("mirror"), layer.str_("suite")
    components = " ".join(layer.strings("components"))
    sources = [f"deb {mirror} {suite} {components}"]
    if layer.bool_("deb_src"):
        sources.append(f"deb-src {mirror} {suite} {components}")
    with temp_file(ctx, ".tar") as out:
        argv = ["mmdebstrap", f"--variant={layer.str_('variant')}", f"--architectures={architecture}",
                f"--components={','.join(layer.strings('components'))}",
                '--aptopt=Acquire::Retries "5"']  # a dropped connection to the archive is retried, not fatal
        if layer.strings("packages"):
            argv.append(f"--include={','.join(layer.strings('packages'))}")
        if os.geteuid() != 0:
            argv.append("--mode=unshare")
        argv += [suite, str(out), *sources]
        env = {**os.environ, "SOURCE_DATE_EPOCH": str(ctx.epoch)}
        ctx.step("mmdebstrap")
        run_streaming(argv, env=env, output=ctx.output, what=f"layer '{layer.name}': mmdebstrap",
                      missing_hint="install mmdebstrap (apt-get install mmdebstrap), or run `ocibuild doctor`",
                      stop=ctx.stop)
        ctx.step("writing the layer")
        entries = [e for e in write.tarball_entries(out, what=f"layer '{layer.name}'", skip_devices=True)]
        return [write_entries(ctx, entries)]


def check_release(layer: LayerRecipe, locked: Input) -> None:
    """A bootstrap layer is built only from the archive state the lock records."""
    current = Digest.of(fetch_bytes(locked.name, what=f"layer '{layer.name}'"))
    if current != locked.digest:
        raise LockError(
            f"layer '{layer.name}': {locked.name} changed since ocibuild.lock was written "
            f"(locked {locked.digest.short}, now {current.short})",
            "run `ocibuild lock` to take the archive's new state (this rebuilds the layer and those above it)",
        )


def run_streaming(argv: Sequence[str], *, env: dict[str, str] | None, output: Output, what: str,
                  missing_hint: str, stop: Stop, tail_lines: int = 20) -> None:
    """Run a helper tool, streaming its output lines to ``output``; StepFailed with the last lines on failure.
    ``stop`` being set terminates it (SIGTERM: the tool may clean up)."""
    tail: list[str] = []
    try:
        proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise EngineError(f"{what}: '{argv[0]}' is not installed", missing_hint) from None
    assert proc.stdout is not None
    with proc, stop.hook(proc.terminate):
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            output(line)
            tail = (tail + [line])[-tail_lines:]
    if proc.returncode != 0:
        raise StepFailed(f"{what} exited {proc.returncode}", "see the output above; fix the recipe and build again",
                         exit_code=proc.returncode, tail="\n".join(tail))
