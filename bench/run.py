"""The benchmark: fabstack beside pyinfra and Ansible, on the same sandbox host, in one run.

    python bench/run.py [noop] [deploy] [fresh]      (all three by default; as root: `make bench`)

noop    A converged sandbox ("bench"): RUNS rounds, each timing one whole no-op converge of
        every tool in turn (fab provision, then the pyinfra deploy and the Ansible playbook of
        bench/peers/, which declare the same resources: bench/manifest.py exports them), plus
        our SSH command round trips per run, our redeploy of the release already current, the
        SSH floor (`ssh host true`), Fabric's own start-up (`fab --list`, no connection) and
        `systemd-analyze security` exposure of the app's and Celery's units.
deploy  DEPLOYS new releases of the example app on the same host, each under a steady request
        stream through NGINX (RATE per second, from a second process): requests sent, failed,
        worst latency, and how long each deploy took.
fresh   FRESH_RUNS times: a new sandbox ("fresh"), `fab provision` timed; another new sandbox,
        the same packages installed by one `apt-get update && apt-get install` (the floor:
        downloads and dpkg, nothing else).

The peers are installed from PyPI by the bench itself (into /var/tmp/fabstack-bench). Figures
go to bench/results.json (each section with its date and machine) and the README's table
between its bench markers is written anew from it. Environment: RUNS (default 7), DEPLOYS (5),
RATE (20), FRESH_RUNS (5).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from manifest import export  # noqa: E402

from sandbox.container import Sandbox  # noqa: E402
from sandbox.tasks import write_settings  # noqa: E402
from tests.load import Load  # noqa: E402

WORK = Path("/var/tmp/fabstack-bench")
RESULTS = REPO / "bench" / "results.json"
README = REPO / "README.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
FAB = str(Path(sys.executable).parent / "fab")
SUMMARY = re.compile(r"\] [\w.-]+: (\d+) changed, .* \((\d+) SSH round trips\)")
RUNS = int(os.environ.get("RUNS", "7"))
DEPLOYS = int(os.environ.get("DEPLOYS", "5"))
RATE = float(os.environ.get("RATE", "20"))
FRESH_RUNS = int(os.environ.get("FRESH_RUNS", "5"))
APP_UNITS = ("ratemyderp.service", "celery.service", "celerybeat.service")
# The commit the bench host runs: pinned, so that a commit made during a run changes nothing.
REDEPLOY = ("deploy", "--ref", subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"],
                                              capture_output=True, text=True).stdout.strip())


# -- running things ----------------------------------------------------------------------

def run(cmd: list[str], env: dict | None = None, cwd: Path = REPO) -> tuple[float, str]:
    """Run ``cmd``; return its wall time and output; stop the bench when it fails."""
    started = time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if res.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n"
                 f"{res.stderr[-3000:]}")
    return elapsed, res.stdout + res.stderr


def fab_summary(output: str) -> tuple[int, int]:
    """(changed, SSH round trips) from the summary line of a fab run."""
    found = SUMMARY.findall(output)
    if not found:
        sys.exit(f"no summary line in fab's output:\n{output[-2000:]}")
    return tuple(map(int, found[-1]))


class Target:
    """A sandbox and the fab command line that reaches it."""

    def __init__(self, info, **settings: str):
        self.info = info
        self.env = dict(os.environ, FABRIC_FABSTACK_ENV_FILE=str(write_settings(info,
                                                                                 **settings)))

    def fab(self, *args: str) -> list[str]:
        return [FAB, "-S", str(self.info.ssh_config), "-H", self.info.alias, *args]

    def ssh(self, command: str) -> list[str]:
        return ["ssh", "-F", str(self.info.ssh_config), self.info.alias, command]

    def converge(self) -> None:
        for attempt in range(1, 4):
            _, out = run(self.fab("provision"), self.env)
            changed, _ = fab_summary(out)
            print(f"  fab provision, run {attempt}: {changed} changed", flush=True)
            if changed == 0:
                return
        sys.exit("the host did not converge in 3 runs")


# -- figures -----------------------------------------------------------------------------

def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": len(values)}


def line(label: str, s: dict, extra: str = "") -> str:
    return (f"  {label:<44} median {s['median']:7.3f} s  min {s['min']:7.3f} s  "
            f"max {s['max']:7.3f} s  {extra}")


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), platform.machine())
    release = dict(ln.split("=", 1) for ln in Path("/etc/os-release").read_text().splitlines()
                   if "=" in ln)
    return (f"{os.cpu_count()} cores ({cpu}), "
            f"{release.get('PRETTY_NAME', 'Linux').strip(chr(34))}, kernel {platform.release()}")


# -- sections ----------------------------------------------------------------------------

def bench_host() -> Target:
    print("bench host: sandbox 'bench' (10.213.48.2), converged and deployed", flush=True)
    target = Target(Sandbox(name="bench", subnet="10.213.48").up())
    target.converge()
    run(target.fab(*REDEPLOY), target.env)
    return target


def noop(target: Target) -> dict:
    from peers import ansible_peer, pyinfra_peer

    manifest = export(Path(target.env["FABRIC_FABSTACK_ENV_FILE"]), target.info.ssh_config,
                      target.info.alias, WORK / "manifest")
    print(f"  manifest: {len(json.loads(manifest.read_text())['resources'])} resources "
          f"declared by provision ({manifest})", flush=True)
    tools = {"fabstack": (target.fab("provision"), target.env,
                          lambda out: fab_summary(out)[0])}
    versions = {}
    for peer in (pyinfra_peer, ansible_peer):
        versions[peer.NAME] = peer.install(WORK)
        cmd, env = peer.command(WORK, manifest, target.info.ssh_config, target.info.alias)
        tools[peer.NAME] = (cmd, env, peer.changed)
        _, out = run(cmd, env)  # warm-up; must find nothing to do on our converged host
        print(f"  {peer.NAME} {versions[peer.NAME]}, warm-up run: {peer.changed(out)} changed",
              flush=True)
    _, out = run(target.fab("provision"), target.env)
    if fab_summary(out)[0] != 0:
        sys.exit(f"the peers changed what fab provision declares:\n{out[-3000:]}")
    walls = {name: [] for name in tools}
    changes = {name: set() for name in tools}
    trips = set()
    print(f"  {RUNS} rounds of one no-op converge per tool...", flush=True)
    for _ in range(RUNS):
        for name, (cmd, env, count) in tools.items():
            wall, out = run(cmd, env)
            walls[name].append(wall)
            changes[name].add(count(out))
            if name == "fabstack":
                trips.add(fab_summary(out)[1])
    # The same no-op with no other tool's run just before it (whose traces the host may
    # still be writing away: journal, PostgreSQL, apt's caches).
    alone = [run(target.fab("provision"), target.env)[0] for _ in range(RUNS)]
    redeploy, redeploy_trips = [], set()
    for _ in range(RUNS):
        wall, out = run(target.fab(*REDEPLOY), target.env)
        changed, round_trips = fab_summary(out)
        if changed:
            sys.exit(f"a redeploy of the current release changed something:\n{out}")
        redeploy.append(wall)
        redeploy_trips.add(round_trips)
    floor = [run(target.ssh("true"))[0] for _ in range(RUNS)]
    startup = [run([FAB, "--list"], target.env)[0] for _ in range(RUNS)]
    _, out = run(target.ssh("systemd-analyze security --no-pager " + " ".join(APP_UNITS)))
    exposure = dict(re.findall(r"^(\S+)\s+(\d+\.\d+)\s", out, re.M))
    ours = statistics.median(walls["fabstack"])
    result = {
        "rounds": RUNS,
        "converge": [{"tool": name, "version": versions.get(name, ""), **stats(w),
                      "ratio": statistics.median(w) / ours,
                      "changed": sorted(changes[name])} for name, w in walls.items()],
        "round_trips": sorted(trips), "alone": stats(alone),
        "redeploy": {**stats(redeploy), "round_trips": sorted(redeploy_trips)},
        "ssh_floor": stats(floor), "fab_startup": stats(startup),
        "exposure": {unit: float(exposure[unit]) for unit in APP_UNITS if unit in exposure},
    }
    print(f"\nno-op converge of the converged host, {RUNS} runs each (whole command):")
    for row in result["converge"]:
        print(line(f"{row['tool']} {row['version']}".strip(), row,
                   f"x{row['ratio']:.1f} of ours, changed: {row['changed']}"))
    print(f"  fab provision SSH command round trips per run: {result['round_trips']}")
    print(line(f"fab provision, {RUNS} runs back to back", result["alone"]))
    print(line("fab deploy, release already current", result["redeploy"],
               f"{result['redeploy']['round_trips']} SSH round trips"))
    print(line("SSH floor: ssh host true", result["ssh_floor"]))
    print(line("fab --list (Python + Fabric start-up, no SSH)", result["fab_startup"]))
    print("  systemd-analyze security exposure: "
          + ", ".join(f"{u} {e}" for u, e in result["exposure"].items()))
    return result


def load_stream(ip: str, rate: float, stop, out) -> None:
    """In a second process: requests at ``rate`` per second until ``stop`` is set."""
    with Load(ip, interval=1 / rate) as load:
        stop.wait()
    out.put({"sent": load.sent, "failed": len(load.failed), "worst": load.worst,
             "errors": [str(e) for e in load.failed[:5]]})


def deploy(target: Target) -> dict:
    repo = WORK / "app"
    shutil.rmtree(repo, ignore_errors=True)
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(repo)], check=True)
    git = ["git", "-C", str(repo), "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    target = Target(target.info, DEPLOY_REPO=str(repo))
    runs = []
    print(f"\n{DEPLOYS} deploys of a new release, each under {RATE:g} requests/s through NGINX:")
    for n in range(DEPLOYS):
        (repo / "example" / "bench-release.txt").write_text(f"{n} {time.time()}\n")
        subprocess.run([*git, "add", "-A"], check=True)
        subprocess.run([*git, "commit", "-qm", f"bench release {n}"], check=True)
        stop, out = multiprocessing.Event(), multiprocessing.Queue()
        stream = multiprocessing.Process(target=load_stream,
                                         args=(target.info.ip, RATE, stop, out))
        stream.start()
        time.sleep(1)
        wall, output = run(target.fab("deploy"), target.env)
        time.sleep(1)
        stop.set()
        figures = {**out.get(timeout=60), "deploy": wall}
        stream.join()
        runs.append(figures)
        print(f"  deploy {n + 1}: {wall:6.2f} s, {figures['sent']} requests, "
              f"{figures['failed']} failed, worst {figures['worst'] * 1000:.0f} ms"
              + (f" {figures['errors']}" if figures["errors"] else ""), flush=True)
    return {"rate": RATE, "runs": runs, "deploy": stats([r["deploy"] for r in runs]),
            "sent": sum(r["sent"] for r in runs), "failed": sum(r["failed"] for r in runs),
            "worst": max(r["worst"] for r in runs)}


def fresh() -> dict:
    box = Sandbox(name="fresh", subnet="10.213.49")
    provisions, installs = [], []
    print(f"\nfresh provision vs one apt-get install, {FRESH_RUNS} new sandboxes each:")
    try:
        for n in range(FRESH_RUNS):
            target = Target(box.up(fresh=True))
            wall, out = run(target.fab("provision"), target.env)
            provisions.append(wall)
            manifest = export(Path(target.env["FABRIC_FABSTACK_ENV_FILE"]),
                              target.info.ssh_config, target.info.alias, WORK / "fresh-manifest")
            packages = sorted({name for r in json.loads(manifest.read_text())["resources"]
                               if r["type"] == "packages" for name in r["names"]})
            target = Target(box.up(fresh=True))
            proxy = target.info.proxy_url
            wall_apt, _ = run(target.ssh(
                f"echo 'Acquire::http::Proxy \"{proxy}\";' > /etc/apt/apt.conf.d/80proxy && "
                "apt-get -q update >/dev/null && DEBIAN_FRONTEND=noninteractive "
                f"apt-get -q -y install {' '.join(packages)} >/dev/null"))
            installs.append(wall_apt)
            print(f"  run {n + 1}: fab provision {wall:6.1f} s ({fab_summary(out)[0]} changed),"
                  f" apt-get install of its {len(packages)} packages {wall_apt:6.1f} s",
                  flush=True)
    finally:
        box.down()
    return {"provision": stats(provisions), "apt_get": stats(installs),
            "ratio": statistics.median(provisions) / statistics.median(installs),
            "packages": packages}


# -- the README's table ------------------------------------------------------------------

def table(results: dict) -> str:
    rows = ["| what | median | min | max | vs ours | notes |",
            "| --- | --- | --- | --- | --- | --- |"]

    def row(what, s, ratio="", notes=""):
        rows.append(f"| {what} | {s['median']:.3f} s | {s['min']:.3f} s | {s['max']:.3f} s | "
                    f"{ratio} | {notes} |")

    notes = []
    if "noop" in results:
        r = results["noop"]
        for c in r["converge"]:
            name = "`fab provision`" if c["tool"] == "fabstack" else f"{c['tool']} {c['version']}"
            row(f"no-op converge: {name}", c, "1" if c["tool"] == "fabstack" else
                f"x{c['ratio']:.1f}", f"changed per run: {', '.join(map(str, c['changed']))}"
                + (f"; {', '.join(map(str, r['round_trips']))} SSH round trips"
                   if c["tool"] == "fabstack" else ""))
        row("no-op converge: `fab provision`, runs back to back (no peer run between)",
            r["alone"], "", "the same command, on a host no other tool has just run on")
        row("`fab deploy` of the release already current", r["redeploy"], "",
            f"{', '.join(map(str, r['redeploy']['round_trips']))} SSH round trips")
        row("SSH floor: `ssh host true`", r["ssh_floor"])
        row("`fab --list`: Python + Fabric start-up, no SSH", r["fab_startup"])
        notes.append(f"noop: {r['rounds']} rounds, {r['date']}")
        exposure = ", ".join(f"{u} {e}" for u, e in r["exposure"].items())
    if "deploy" in results:
        d = results["deploy"]
        row(f"`fab deploy` of a new release under {d['rate']:g} requests/s", d["deploy"], "",
            f"{d['sent']} requests, {d['failed']} failed, worst {d['worst'] * 1000:.0f} ms")
        notes.append(f"deploy: {len(d['runs'])} deploys, {d['date']}")
    if "fresh" in results:
        f = results["fresh"]
        row("`fab provision` of a fresh host", f["provision"], "1")
        row(f"floor: one `apt-get install` of its {len(f['packages'])} packages", f["apt_get"],
            f"x{1 / f['ratio']:.2f}")
        notes.append(f"fresh: {f['provision']['runs']} hosts each, {f['date']}")
    machines = sorted({r["machine"] for r in results.values()})
    text = "\n".join(rows) + "\n\n"
    if "noop" in results:
        text += f"`systemd-analyze security` exposure (lower is safer): {exposure}.\n"
    text += (f"Measured on {'; '.join(machines)}; {'; '.join(notes)}. Regenerate with "
             "`make bench` (`python bench/run.py noop|deploy|fresh` for one section).\n")
    return text


def write_readme(results: dict) -> None:
    text = README.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    README.write_text(text[:start] + "\n" + table(results) + text[end:])


def main(sections: list[str]) -> None:
    unknown = set(sections) - {"noop", "deploy", "fresh"}
    if unknown:
        sys.exit(f"unknown section(s): {', '.join(sorted(unknown))} (noop, deploy, fresh)")
    sections = sections or ["noop", "deploy", "fresh"]
    WORK.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    stamp = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
             "machine": machine()}
    target = bench_host() if {"noop", "deploy"} & set(sections) else None
    for name in sections:
        result = {"noop": lambda: noop(target), "deploy": lambda: deploy(target),
                  "fresh": fresh}[name]()
        results[name] = {**result, **stamp}
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    write_readme(results)
    print(f"\nresults: {RESULTS.relative_to(REPO)}; README table regenerated")


if __name__ == "__main__":
    main(sys.argv[1:])
