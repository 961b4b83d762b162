#!/usr/bin/env python3
"""Issue 3's benchmarks: a run layer against a `podman build` RUN step doing the same on the same base, and
`ocibuild run` start-up against `podman run` of the same image. Interleaved, medians.

1. run layer: the same script (2,000 small files and a 20 MB file, no network) on the Debian base of
   make_base.sh, with new content each round so both tools run it: `ocibuild build` of a project
   [base (image), step (run)] vs `podman build --layers` of FROM base + RUN script. "script alone" is
   `podman run --rm base sh -c script`, so each tool's overhead beyond the script is (tool - script alone).
2. start-up: `ocibuild run -- true` (plan, no-op build, image already in podman) vs `podman run --rm IMAGE true`.

Usage: python3 bench/run_layer.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import statistics

from _harness import CACHE, OCIBUILD, WITH_PYC, Case, interleave, log, prepare_inputs, report, run, timed, write_if_changed

PROJECT = CACHE / "run-layer"
STORE = CACHE / "store-run-layer"
SCRIPT = """mkdir -p /opt/work
i=0
while [ $i -lt 2000 ]; do echo "file $i round {round}" > /opt/work/f$i; i=$((i+1)); done
head -c 20000000 /dev/zero > /opt/work/blob
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    base = prepare_inputs()
    base_id = run(["podman", "pull", "-q", f"oci-archive:{base}:base"]).stdout.strip().splitlines()[-1]
    write_if_changed(PROJECT / "ocibuild.toml",
                     '[image]\nname = "run-bench"\nlayers = ["base", "step"]\n[run]\nnetwork = false\n')
    write_if_changed(PROJECT / "layers/base/layer.toml", f'kind = "image"\nref = "oci-archive:{base}:base"\n')
    write_if_changed(PROJECT / "layers/step/layer.toml",
                     'kind = "run"\nneeds = ["base"]\nscript = "script.sh"\nnetwork = false\n')

    def set_round(i: int) -> None:
        text = SCRIPT.format(round=f"{i}-{id(args)}")
        (PROJECT / "layers/step/script.sh").write_text(text)
        (PROJECT / "Containerfile").write_text(f"FROM {base_id}\nRUN {text.strip().replace(chr(10), '; ')}\n")

    def ocibuild_case(i: int) -> float:
        t, proc = timed([OCIBUILD, "build", "--json", "--store", str(STORE)], cwd=PROJECT, env=WITH_PYC)
        statuses = [layer["status"] for layer in json.loads(proc.stdout)["layers"]]
        assert statuses[-1] == "built", statuses
        return t

    def podman_case(i: int) -> float:
        t, _ = timed(["podman", "build", "--layers", "--pull=never", "-q", "-t", "run-bench-podman", "-f",
                      str(PROJECT / "Containerfile"), str(PROJECT)])
        return t

    def script_case(i: int) -> float:
        text = (PROJECT / "layers/step/script.sh").read_text()
        t, _ = timed(["podman", "run", "--rm", "--network=none", base_id, "sh", "-c", text])
        return t

    set_round(-1)
    run([OCIBUILD, "build", "--store", str(STORE)], cwd=PROJECT, env=WITH_PYC)  # warm: base imported once
    cases: dict[str, Case] = {"ocibuild run layer": ocibuild_case, "podman build RUN": podman_case,
                              "script alone (podman run)": script_case}
    times = interleave(cases, args.runs, before_run=set_round)
    med = {k: statistics.median(v) for k, v in times.items()}
    script = med["script alone (podman run)"]
    report("run layer vs podman build RUN (same script, same base)", times,
           [("podman build / ocibuild (time ratio)", "podman build RUN", "ocibuild run layer")],
           extra={"overhead beyond the script: ocibuild": med["ocibuild run layer"] - script,
                  "overhead beyond the script: podman build": med["podman build RUN"] - script})
    log(f"overhead beyond the script: ocibuild {med['ocibuild run layer'] - script:.2f} s, "
        f"podman build {med['podman build RUN'] - script:.2f} s")

    image = json.loads(run([OCIBUILD, "build", "--json", "--store", str(STORE)], cwd=PROJECT, env=WITH_PYC).stdout)
    config = run(["skopeo", "inspect", "--raw", f"oci:{STORE}:run-bench"]).stdout
    image_id = json.loads(config)["config"]["digest"].split(":")[1]
    run([OCIBUILD, "run", "--store", str(STORE), "--", "true"], cwd=PROJECT, env=WITH_PYC)  # image into podman
    startup: dict[str, Case] = {
        "ocibuild run -- true": lambda i: timed([OCIBUILD, "run", "--store", str(STORE), "--", "true"], cwd=PROJECT,
                                                env=WITH_PYC)[0],
        "podman run --rm IMAGE true": lambda i: timed(["podman", "run", "--rm", "--network=none", image_id, "true"])[0],
    }
    report("ocibuild run start-up vs podman run (same image)", interleave(startup, args.runs * 2),
           [("ocibuild run / podman run (time ratio)", "ocibuild run -- true", "podman run --rm IMAGE true")],
           extra={"image": image["digest"]})


if __name__ == "__main__":
    main()
