"""Benchmark: a no-op `fab provision` and a redeploy of an unchanged release.

Boots (or reuses) the sandbox "bench", provisions it until a run changes
nothing and deploys the example app, then times RUNS more runs of each whole
`fab` command (process start, SSH connect, probes, report) and prints wall time
(median, min, max) with the SSH command round trips each run made, beside the
SSH floor (one `ssh` that runs `true`). Run as root: `make bench`.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tasks.sandbox import Sandbox, write_settings  # noqa: E402

RUNS = int(os.environ.get("BENCH_RUNS", "7"))
FAB = str(Path(sys.executable).parent / "fab")
SUMMARY = re.compile(r"\] \w+: (\d+) changed, .* \((\d+) SSH round trips\)")


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    started = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if res.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr}")
    return elapsed, res.stdout


def figures(values: list[float]) -> str:
    return (f"median {statistics.median(values):.3f} s  min {min(values):.3f} s  "
            f"max {max(values):.3f} s")


def main() -> None:
    info = Sandbox(name="bench", subnet="10.213.48").up()
    env = dict(os.environ, FABRIC_FABSTACK_ENV_FILE=str(write_settings(info)))
    fab = [FAB, "-S", str(info.ssh_config), "-H", info.alias, "provision"]
    for attempt in range(3):
        _, out = timed(fab, env)
        changed = int(SUMMARY.search(out).group(1))
        print(f"converge run {attempt + 1}: {changed} changed", flush=True)
        if changed == 0:
            break
    else:
        sys.exit("the host did not converge in 3 runs")
    timed([*fab[:-1], "deploy"], env)
    print(f"\n{RUNS} runs each on a converged Debian {info.suite} sandbox:")
    for label, cmd in (("no-op provision", fab), ("redeploy, same commit", [*fab[:-1], "deploy"])):
        walls, trips = [], set()
        for _ in range(RUNS):
            wall, out = timed(cmd, env)
            changed, round_trips = map(int, SUMMARY.search(out).groups())
            assert changed == 0, out
            walls.append(wall)
            trips.add(round_trips)
        print(f"  fab {label:<22} {figures(walls)}  "
              f"SSH round trips per run: {', '.join(map(str, sorted(trips)))}")
    floor = [timed(["ssh", "-F", str(info.ssh_config), info.alias, "true"], env)[0]
             for _ in range(RUNS)]
    print(f"  {'SSH floor (ssh host true)':<26} {figures(floor)}")


if __name__ == "__main__":
    main()
