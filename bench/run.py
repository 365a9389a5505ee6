"""The benchmark: fabstack beside pyinfra and Ansible, on the same sandbox host, in one run.

    python bench/run.py [noop] [deploy] [fresh] [cluster] [rolling]
                                                  (all by default; as root: `make bench`)

noop    A converged sandbox: RUNS rounds, each timing one whole no-op converge of every tool
        in turn: fab provision, fab provision with its upgrade check forced (the peers
        simulate or run an upgrade on every run; fab skips the simulation while dpkg's status
        and the apt lists are as they were at the last one that found nothing), then the
        pyinfra deploy and the Ansible playbook of bench/peers/, which declare the same
        resources (bench/manifest.py exports them); then RUNS rounds of each tool's empty run
        (start-up, one connection, `true` on the host: its fixed cost). Each run must prove
        it covered the same work, or the bench fails and says which tool and what it missed:
        every resource of the manifest in fab's report, every resource among pyinfra's
        operations, every task of the play ok in Ansible's recap. Then fab provision RUNS
        times back to back, our SSH command round trips per run, our redeploy of the release
        already current, the SSH floor (`ssh host true`), Fabric's own start-up (`fab --list`,
        no connection) and `systemd-analyze security` exposure of the app's and Celery's
        units.
deploy  On the same host, each under a steady request stream through NGINX (RATE per second, from a
        second process at niceness -10, as a client on another machine would not wait for this
        machine's fab; from a second before the command to TAIL seconds after it, the latencies
        counted from the command's start to the end: what a deploy sets going on the host after fab
        returns, the old instance's stop and Celery's warm restart, counts): DEPLOYS new commits of
        the example app with the same requirements, REQ_DEPLOYS new commits that each add one
        requirement (a new virtualenv: six, then idna, then pyparsing...), and ROLLBACKS rollbacks;
        for each kind how long fab took and its SSH round trips, and over all of them the requests
        sent, failed, the 99th percentile and the worst latency. Each command is paired with a
        control: SETTLE seconds after it, the same stream for as long again with no command, so that
        the median, 99th percentile and worst of as many requests with no deploy stand beside those
        figures: a worst request during deploys is judged against the machine's own spread, not
        against a quiet sample a fifth of the size. Each pair starts 1.5 s after a minute's turn:
        this machine's own agent (its PID 1, at niceness -10) takes about 40 ms of CPU at each
        minute's turn, and a stream with no deploy at all has its worst requests then (12 to 18 ms
        against a 4 ms median, 2026-11-30), a burst a real server does not have. The stream's client
        spends about 0.5 ms of CPU per request (tests/load.py), so what it measures is the site's
        latency.
fresh   FRESH_RUNS times: a new sandbox, `fab provision` timed (the settings a user starts
        with); another new sandbox, the same packages installed by one `apt-get update &&
        apt-get install` (the floor: downloads and dpkg, nothing else); their ratio (target:
        at most FRESH_TARGET). A fresh provision also installs the pending security upgrades
        (UPGRADE empty: security on a first provision), which that floor does not: a third new
        sandbox installs the packages and the same upgrades (those `apt-get -s dist-upgrade`
        takes from a security archive, as fab's plan does) in one `apt-get install`, the floor
        of the same work, and the ratio is given against it too.
cluster CLUSTER_RUNS times: a new sandbox, `fab provision` timed; a new cluster of two sandboxes
        with the site spread over them (app: lb, web, worker; data: db, redis), `fab provision`
        of both at once timed (no -H: the inventory); then RUNS no-op provisions of each, in
        turn. Both with the settings a user starts with. Targets (issue 13): the site's fresh
        provision at most CLUSTER_TARGET times the single host's, its no-op too.
rolling A new cluster of five sandboxes with a site spread over them (lb; web1 and web2; a worker;
        data: db, redis), provisioned and deployed once; then ROLLING_RUNS rolling deploys (`fab
        deploy`, no -H) of new commits of the example app, each under the request stream of the
        deploy section through the lb, paired with its control as there: how long each took, its
        SSH round trips on all hosts, and the requests sent, failed, their 99th percentile and
        the worst, beside as many with no deploy.

The peers come from the `bench` extra of pyproject.toml (`make bench` installs it). Figures
go to bench/results.json (each section with its date, machine and the load average as it
began and ended) and the README's block between its bench markers is written anew from it.
Environment: RUNS (default 7), DEPLOYS (5), REQ_DEPLOYS (2), ROLLBACKS (2), RATE (50),
TAIL (4), SETTLE (5), FRESH_RUNS (5), CLUSTER_RUNS (3), ROLLING_RUNS (3),
FABSTACK_BENCH_SANDBOX=NAME:SUBNET (the one sandbox the bench
boots, default bench:10.213.48; the fresh and cluster sections recreate it for each new host;
the cluster's is NAMEc on SUBNET with the second octet three up, 10.216.48; the rolling
section's is the first three letters of NAME and r (benr), four up, 10.217.48).
"""

from __future__ import annotations

import functools
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
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from manifest import export  # noqa: E402

from sandbox.cluster import Cluster  # noqa: E402
from sandbox.container import Sandbox  # noqa: E402
from sandbox.tasks import write_settings  # noqa: E402
from tasks.primitives import UPGRADE_STAMP  # noqa: E402
from tests.load import Load  # noqa: E402

RESULTS = REPO / "bench" / "results.json"
README = REPO / "README.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
FAB = str(Path(sys.executable).parent / "fab")
SUMMARY = re.compile(r"\] [\w.-]+: (\d+) changed, (\d+) ok, (\d+) failed in .* "
                     r"\((\d+) SSH round trips\)")
REPORT = re.compile(r"^\[[^\]\n]+\] (changed|ok)\s+(.*)$", re.M)
RUNS = int(os.environ.get("RUNS", "7"))
DEPLOYS = int(os.environ.get("DEPLOYS", "5"))
REQ_DEPLOYS = int(os.environ.get("REQ_DEPLOYS", "2"))
ROLLBACKS = int(os.environ.get("ROLLBACKS", "2"))
RATE = float(os.environ.get("RATE", "50"))
TAIL = float(os.environ.get("TAIL", "4"))
SETTLE = float(os.environ.get("SETTLE", "5"))
KINDS = {"deploy": "`fab deploy` of a new commit, same requirements",
         "requirement": "`fab deploy` of a new commit adding a requirement",
         "rollback": "`fab rollback`"}
ADDED_REQUIREMENTS = ("six==1.17.0", "idna==3.10", "pyparsing==3.2.3", "packaging==25.0")
FRESH_RUNS = int(os.environ.get("FRESH_RUNS", "5"))
CLUSTER_RUNS = int(os.environ.get("CLUSTER_RUNS", "3"))
ROLLING_RUNS = int(os.environ.get("ROLLING_RUNS", "3"))
# The rolling section's site: each host's roles.
ROLLING_SITE = {"lb": ["lb"], "web1": ["web"], "web2": ["web"], "worker": ["worker"],
                "data": ["db", "redis"]}
SANDBOX_NAME, SANDBOX_SUBNET = os.environ.get("FABSTACK_BENCH_SANDBOX",
                                              "bench:10.213.48").split(":")
WORK = Path("/var/tmp/fabstack-bench") / SANDBOX_NAME
# The bench host's settings: the same work for every tool (all pending upgrades installed:
# the peers have no "security only" or "list only"), and no apt-daily-upgrade taking dpkg's
# lock in the middle of a round.
BENCH_SETTINGS = {"UPGRADE": "all", "UNATTENDED_UPGRADES": "False"}
APP_UNITS = ("ratemyderp@blue.service", "celery.service", "celerybeat.service")
# The commit the bench host runs: pinned, so that a commit made during a run changes nothing.
REDEPLOY = ("deploy", "--ref", subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"],
                                              capture_output=True, text=True).stdout.strip())
# Targets: issue 6 (no-op converge, peers, redeploy, requests during deploys), issue 11
# (a fresh provision beside one apt-get install of its packages) and issue 12 (deploys and
# rollbacks under at least 50 requests/s).
NOOP_TARGET, PYINFRA_TARGET, ANSIBLE_TARGET, REDEPLOY_TARGET = 1.0, 3, 10, 5.0
FRESH_TARGET = 1.15
CLUSTER_TARGET = 1.5  # issue 13: a site spread over hosts beside one host, fresh and no-op
DEPLOY_TARGET, REQ_DEPLOY_TARGET, ROLLBACK_TARGET, LATENCY_TARGET = 5.0, 15.0, 2.0, 3
# Of each section of bench/results.json: one of another format is dropped, not merged.
FORMATS = {"noop": 2, "deploy": 6, "fresh": 3, "cluster": 1, "rolling": 1}


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


def fab_summary(output: str) -> tuple[int, int, int, int]:
    """(changed, ok, failed, SSH round trips) from the summary line of a fab run."""
    found = SUMMARY.findall(output)
    if not found:
        sys.exit(f"no summary line in fab's output:\n{output[-2000:]}")
    return tuple(map(int, found[-1]))


def fab_check(output: str, manifest: Path) -> int:
    """changed of a fab provision run; ValueError unless its report has a line for every
    resource of ``manifest`` (and its notes) and no other, its summary counts as many (changed
    + ok), and nothing failed."""
    changed, ok, failed, _ = fab_summary(output)
    data = json.loads(manifest.read_text())
    lines = [text for _, text in REPORT.findall(output)]
    missing, wanted = [], [r["what"] for r in data["resources"]] + data["notes"]
    for what in wanted:
        hit = next((n for n, text in enumerate(lines) if text.startswith(f"{what}: ")), None)
        if hit is None:
            missing.append(what)
        else:
            del lines[hit]
    declared = f"{len(data['resources'])} resources and {len(data['notes'])} notes"
    if failed or missing or lines or changed + ok != len(wanted):
        raise ValueError(f"{changed} changed, {ok} ok, {failed} failed for the manifest's "
                         f"{declared}; not reported: {', '.join(missing) or 'none'}; "
                         f"reported, not in the manifest: {', '.join(lines) or 'none'}")
    return changed


def covered(tool: str, check: Callable[[str], int], output: str) -> int:
    """``check``(output): the changes of a run that covered the manifest, or the bench stops."""
    try:
        return check(output)
    except ValueError as e:
        sys.exit(f"bench failed: {tool}'s run did not cover the work fab provision "
                 f"declares: {e}")


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
            changed = fab_summary(out)[0]
            print(f"  fab provision, run {attempt}: {changed} changed", flush=True)
            if changed == 0:
                return
        sys.exit("the host did not converge in 3 runs")


@dataclass
class Tool:
    """One line of the no-op comparison: a converge command, its empty run, its check."""

    name: str
    version: str
    converge: tuple[list[str], dict]
    empty: tuple[list[str], dict] | None  # None: the same as the line above's
    check: Callable[[str], int]
    before: list[str] | None = None  # run (untimed) before each timed converge
    walls: list[float] = field(default_factory=list)
    empties: list[float] = field(default_factory=list)
    changes: set[int] = field(default_factory=set)


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

def sandbox() -> Sandbox:
    return Sandbox(name=SANDBOX_NAME, subnet=SANDBOX_SUBNET)


def bench_host() -> Target:
    box = sandbox()
    print(f"bench host: sandbox {box.name!r} ({box.ip}), converged and deployed", flush=True)
    target = Target(box.up(), **BENCH_SETTINGS)
    target.converge()
    run(target.fab(*REDEPLOY), target.env)
    return target


def noop(target: Target) -> dict:
    from peers import ansible_peer, pyinfra_peer

    manifest = export(Path(target.env["FABRIC_FABSTACK_ENV_FILE"]), target.info.ssh_config,
                      target.info.alias, WORK / "manifest")
    declared = json.loads(manifest.read_text())
    print(f"  manifest: {len(declared['resources'])} resources and {len(declared['notes'])} "
          f"notes declared by provision ({manifest})", flush=True)
    ssh_config, alias = target.info.ssh_config, target.info.alias
    ours = (target.fab("provision"), target.env)
    empty = (target.fab("--", "true"), target.env)
    tools = [Tool("fabstack", "", ours, empty, lambda out: fab_check(out, manifest)),
             Tool("fabstack, upgrade check forced", "", ours, None,
                  lambda out: fab_check(out, manifest),
                  before=target.ssh(f"rm -f {UPGRADE_STAMP}"))]
    for peer in (pyinfra_peer, ansible_peer):
        tool = Tool(peer.NAME, peer.version(),
                    peer.command(WORK, manifest, ssh_config, alias),
                    peer.empty(WORK, ssh_config, alias),
                    lambda out, peer=peer: peer.check(out, manifest))
        tools.append(tool)
        _, out = run(*tool.converge)  # warm-up; must find nothing to do on our converged host
        print(f"  {tool.name} {tool.version}, warm-up run: "
              f"{covered(tool.name, tool.check, out)} changed", flush=True)
    _, out = run(*ours)
    if covered("fabstack", tools[0].check, out) != 0:
        sys.exit(f"the peers changed what fab provision declares:\n{out[-3000:]}")
    trips = set()
    print(f"  {RUNS} rounds of one no-op converge per tool...", flush=True)
    for _ in range(RUNS):
        for tool in tools:
            if tool.before:
                run(tool.before)
            wall, out = run(*tool.converge)
            tool.walls.append(wall)
            tool.changes.add(covered(tool.name, tool.check, out))
            if tool is tools[0]:
                trips.add(fab_summary(out)[3])
    print(f"  {RUNS} rounds of one empty run per tool (start-up, one connection, `true`)...",
          flush=True)
    for _ in range(RUNS):
        for tool in tools:
            if tool.empty:
                tool.empties.append(run(*tool.empty)[0])
    # The same no-op with no other tool's run just before it (whose traces the host may
    # still be writing away: journal, PostgreSQL, apt's caches).
    alone = [run(*ours)[0] for _ in range(RUNS)]
    redeploy, redeploy_trips = [], set()
    for _ in range(RUNS):
        wall, out = run(target.fab(*REDEPLOY), target.env)
        changed, _, _, round_trips = fab_summary(out)
        if changed:
            sys.exit(f"a redeploy of the current release changed something:\n{out}")
        redeploy.append(wall)
        redeploy_trips.add(round_trips)
    floor = [run(target.ssh("true"))[0] for _ in range(RUNS)]
    startup = [run([FAB, "--list"], target.env)[0] for _ in range(RUNS)]
    _, out = run(target.ssh("systemd-analyze security --no-pager " + " ".join(APP_UNITS)))
    exposure = dict(re.findall(r"^(\S+)\s+(\d+\.\d+)\s", out, re.M))
    base = statistics.median(tools[0].walls)
    result = {
        "rounds": RUNS, "resources": len(declared["resources"]),
        "converge": [{"tool": t.name, "version": t.version, **stats(t.walls),
                      "ratio": statistics.median(t.walls) / base,
                      "changed": sorted(t.changes),
                      "empty": stats(t.empties) if t.empties else None}
                     for t in tools],
        "round_trips": sorted(trips), "alone": stats(alone),
        "redeploy": {**stats(redeploy), "round_trips": sorted(redeploy_trips)},
        "ssh_floor": stats(floor), "fab_startup": stats(startup),
        "exposure": {unit: float(exposure[unit]) for unit in APP_UNITS if unit in exposure},
    }
    print(f"\nno-op converge of the converged host, {RUNS} runs each (whole command), every "
          f"run covering the manifest's {result['resources']} resources; beside it the "
          "tool's empty run (start-up, one connection, `true` on the host):")
    for row in result["converge"]:
        print(line(f"{row['tool']} {row['version']}".strip(), row,
                   f"x{row['ratio']:.1f} of ours, changed: {row['changed']}"
                   + (f"; empty run median {row['empty']['median']:.3f} s" if row["empty"]
                      else "")))
    print(f"  fab provision SSH command round trips per run: {result['round_trips']}")
    print(line(f"fab provision, {RUNS} runs back to back", result["alone"]))
    print(line("fab deploy, release already current", result["redeploy"],
               f"{result['redeploy']['round_trips']} SSH round trips"))
    print(line("SSH floor: ssh host true", result["ssh_floor"]))
    print(line("fab --list (Python + Fabric start-up, no SSH)", result["fab_startup"]))
    print("  systemd-analyze security exposure: "
          + ", ".join(f"{u} {e}" for u, e in result["exposure"].items()))
    return result


def load_stream(ip: str, rate: float, measure, stop, out) -> None:
    """In a second process: requests at ``rate`` per second until ``stop`` is set; their
    latencies from the moment ``measure`` is set (the stream's first requests, a new process's
    first connections, are not the site's), every request counted as sent or failed.

    The process runs at niceness -10: the client of a real site is another machine, so the
    time this one's fab (Python) takes from it is not the site's latency."""
    os.nice(-10 - os.nice(0))
    with Load(ip, interval=1 / rate) as load:
        measure.wait()
        first = len(load.latencies)
        stop.wait()
    latencies = load.latencies[first:]
    out.put({"sent": load.sent, "failed": len(load.failed),
             "worst": max(latencies, default=0.0),
             "median": statistics.median(latencies) if latencies else 0.0,
             "latencies": latencies, "errors": [str(e) for e in load.failed[:5]]})


def p99(latencies: list[float]) -> float:
    """The latency 99 requests in 100 do not exceed."""
    return statistics.quantiles(latencies, n=100)[98] if len(latencies) > 1 else max(latencies)


def under_stream(ip: str, action: Callable[[], tuple[float, str]] | None,
                 seconds: float = 0.0) -> dict:
    """``action`` (or ``seconds`` of nothing) under the request stream, which starts a second
    before it and ends TAIL seconds after it: its figures (latencies from the action's start
    on)."""
    measure, stop, out = (multiprocessing.Event(), multiprocessing.Event(),
                          multiprocessing.Queue())
    stream = multiprocessing.Process(target=load_stream, args=(ip, RATE, measure, stop, out))
    stream.start()
    time.sleep(1)
    measure.set()
    wall, output = action() if action else (time.sleep(seconds), "")
    time.sleep(TAIL)
    stop.set()
    figures = {**out.get(timeout=60), "wall": wall or 0.0,  # round trips: on every host
               "round_trips": sum(int(found[3]) for found in SUMMARY.findall(output))}
    stream.join()
    return figures


def aside(cmd: list[str]) -> list[str]:
    """``cmd`` at the lowest CPU priority, in a session (an autogroup) of its own: fab runs on
    the operator's machine, not on the one that serves, whose CPU the site and the stream
    share here."""
    return ["setsid", "sh", "-c", 'echo 19 > /proc/self/autogroup && exec "$@"', "fab", *cmd]


def app_clone(name: str) -> tuple[Path, list[str]]:
    """A fresh clone of this repository (the example app to deploy) and the git command line
    that commits in it."""
    repo = WORK / name
    shutil.rmtree(repo, ignore_errors=True)
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(repo)], check=True)
    return repo, ["git", "-C", str(repo), "-c", "user.name=bench", "-c",
                  "user.email=bench@localhost"]


def deploy(target: Target) -> dict:
    repo, git = app_clone("app")
    target = Target(target.info, **BENCH_SETTINGS, DEPLOY_REPO=str(repo))
    ip = target.info.ip
    requirements = repo / "example" / "requirements.txt"

    def release(n: int, added: int = 0) -> tuple[float, str]:
        (repo / "example" / "bench-release.txt").write_text(f"{n} {time.time()}\n")
        if added:
            with requirements.open("a") as f:
                f.write(ADDED_REQUIREMENTS[(added - 1) % len(ADDED_REQUIREMENTS)] + "\n")
        subprocess.run([*git, "add", "-A"], check=True)
        subprocess.run([*git, "commit", "-qm", f"bench release {n}"], check=True)
        return run(aside(target.fab("deploy")), target.env)

    print(f"\nDeploys and rollbacks, each under {RATE:g} requests/s through NGINX, and as long "
          f"again with no deploy ({SETTLE:g} s after it):")
    kinds = {"deploy": [], "requirement": [], "rollback": []}
    controls = []
    plan = ([("deploy", lambda n=n: release(n)) for n in range(DEPLOYS)]
            + [("requirement", lambda n=n: release(DEPLOYS + n, added=n + 1))
               for n in range(REQ_DEPLOYS)]
            + [("rollback", lambda: run(aside(target.fab("rollback")), target.env))] * ROLLBACKS)
    for kind, action in plan:
        time.sleep(-(time.time() - 1.5) % 60)  # to 1.5 s past a minute's turn (the docstring)
        figures = under_stream(ip, action)
        kinds[kind].append(figures)
        time.sleep(SETTLE)
        control = under_stream(ip, None, figures["wall"])
        controls.append(control)
        print(f"  {kind}: {figures['wall']:6.2f} s, {figures['round_trips']} SSH round trips, "
              f"{figures['sent']} requests, {figures['failed']} failed, worst "
              f"{figures['worst'] * 1000:.0f} ms; with no deploy: {control['failed']} failed, "
              f"worst {control['worst'] * 1000:.0f} ms"
              + (f" {figures['errors']}" if figures["errors"] else "")
              + (f" {control['errors']}" if control["errors"] else ""), flush=True)
    runs = [r for rs in kinds.values() for r in rs]
    return {"rate": RATE, **{name: spread(rs) for name, rs in (("during", runs),
                                                                ("quiet", controls))},
            **{kind: {**stats([r["wall"] for r in rs]),
                      "round_trips": sorted({r["round_trips"] for r in rs}), "runs": len(rs)}
               for kind, rs in kinds.items() if rs}}


def spread(runs: list[dict]) -> dict:
    """Requests sent and failed over ``runs`` of the stream, their median, 99th percentile
    and worst latency."""
    latencies = [latency for r in runs for latency in r["latencies"]]
    return {"sent": sum(r["sent"] for r in runs), "failed": sum(r["failed"] for r in runs),
            "median": statistics.median(latencies), "p99": p99(latencies),
            "worst": max(latencies)}


# The floor's apt-get, and the security upgrades a first provision installs (the packages of
# `apt-get -s dist-upgrade` from a security archive: DistUpgrade's plan in mode "first").
APT_GET = "DEBIAN_FRONTEND=noninteractive apt-get -q -y"
SECURITY_PENDING = ("apt-get -s dist-upgrade | awk '/^Inst / && /-security/ {print $2}'")


def floor(target: Target, packages: list[str], upgrades: bool) -> tuple[float, int]:
    """One `apt-get update && apt-get install` of ``packages`` on a fresh ``target`` (with the
    pending security upgrades named in the same install when ``upgrades``): its wall time and
    how many upgrades it named."""
    proxy = target.info.proxy_url
    wall, out = run(target.ssh(
        f"echo 'Acquire::http::Proxy \"{proxy}\";' > /etc/apt/apt.conf.d/80proxy && "
        "apt-get -q update >/dev/null && "
        + (f"up=$({SECURITY_PENDING}) && " if upgrades else "up= && ")
        + f"{APT_GET} install {' '.join(packages)} $up >/dev/null && "
        "echo \"upgrades named: $(echo $up | wc -w)\""))
    return wall, int(re.search(r"^upgrades named: (\d+)$", out, re.M)[1])


def fresh() -> dict:
    box = sandbox()
    provisions, installs, upgrades = [], [], []
    installs_upgraded, floor_upgrades = [], []
    print(f"\nfresh provision vs one apt-get install, {FRESH_RUNS} new sandboxes each:")
    try:
        for n in range(FRESH_RUNS):
            target = Target(box.up(fresh=True))
            wall, out = run(target.fab("provision"), target.env)
            provisions.append(wall)
            manifest = export(Path(target.env["FABRIC_FABSTACK_ENV_FILE"]),
                              target.info.ssh_config, target.info.alias, WORK / "fresh-manifest")
            changed = covered("fabstack (fresh provision)",
                              functools.partial(fab_check, manifest=manifest), out)
            upgrade = re.search(r"^\[[^\]\n]+\] \S+\s+system upgrade: (.*)$", out, re.M)
            upgrades.append(upgrade[1].split(":")[0] if upgrade else "no report line")
            packages = sorted({name for r in json.loads(manifest.read_text())["resources"]
                               if r["type"] == "packages" for name in r["names"]})
            wall_apt, _ = floor(Target(box.up(fresh=True)), packages, upgrades=False)
            installs.append(wall_apt)
            wall_up, named = floor(Target(box.up(fresh=True)), packages, upgrades=True)
            installs_upgraded.append(wall_up)
            floor_upgrades.append(named)
            print(f"  run {n + 1}: fab provision {wall:6.1f} s ({changed} changed; system "
                  f"upgrade: {upgrades[-1]}), apt-get install "
                  f"of its {len(packages)} packages {wall_apt:6.1f} s, ratio "
                  f"{wall / wall_apt:.2f}; with the {named} security upgrades {wall_up:6.1f} s,"
                  f" ratio {wall / wall_up:.2f}", flush=True)
    finally:
        box.down()
    result = {"provision": stats(provisions), "apt_get": stats(installs),
              "ratio": statistics.median(provisions) / statistics.median(installs),
              "apt_get_upgrades": stats(installs_upgraded),
              "ratio_upgrades": (statistics.median(provisions)
                                 / statistics.median(installs_upgraded)),
              "packages": packages, "upgrades": upgrades, "floor_upgrades": floor_upgrades}
    print(line("fab provision of a fresh host", result["provision"]))
    print(line(f"one apt-get install of its {len(packages)} packages", result["apt_get"]))
    print(line("the same, with the security upgrades", result["apt_get_upgrades"],
               f"security upgrades named: {sorted(set(floor_upgrades))}"))
    print(f"  fresh provision / apt-get install, medians of this run: {result['ratio']:.2f}x "
          f"(target: at most {FRESH_TARGET}x); against the install with the same security "
          f"upgrades: {result['ratio_upgrades']:.2f}x")
    return result


def spread_site(info) -> tuple[list[str], dict]:
    """The fab command line (and environment) that acts on the site spread over the cluster
    ``info``: its inventory in a runtime configuration file, the settings a user starts with."""
    app, data = info.members.values()
    inventory = WORK / "cluster.yaml"
    inventory.write_text(json.dumps({"fabstack": {"hosts": {  # JSON is YAML
        "app": {"ssh": app.alias, "private": app.ip, "roles": ["lb", "web", "worker"]},
        "data": {"ssh": data.alias, "private": data.ip, "roles": ["db", "redis"]}}}}))
    env = dict(os.environ, FABRIC_FABSTACK_ENV_FILE=str(write_settings(info,
                                                                      WORK / "cluster.env")))
    return [FAB, "-S", str(info.ssh_config), "-f", str(inventory)], env


def cluster() -> dict:
    box = sandbox()
    first, second, third = SANDBOX_SUBNET.split(".")
    site = Cluster(name=f"{SANDBOX_NAME}c"[:9], members=("app", "data"),
                   subnet=f"{first}.{int(second) + 3}.{third}")
    singles, sites, noop_singles, noop_sites = [], [], [], []
    print(f"\nfresh provision of a site spread over 2 hosts vs one host, {CLUSTER_RUNS} each:")
    try:
        for n in range(CLUSTER_RUNS):
            target = Target(box.up(fresh=True))
            wall, _ = run(target.fab("provision"), target.env)
            singles.append(wall)
            fab, env = spread_site(site.up(fresh=True))
            wall_site, out = run([*fab, "provision"], env)
            sites.append(wall_site)
            print(f"  run {n + 1}: one host {wall:6.1f} s, the site on two hosts at once "
                  f"{wall_site:6.1f} s, ratio {wall_site / wall:.2f}", flush=True)
        for _ in range(RUNS):
            noop_singles.append(run(target.fab("provision"), target.env)[0])
            noop_sites.append(run([*fab, "provision"], env)[0])
    finally:
        box.down()
        site.down()
    result = {"single": stats(singles), "site": stats(sites),
              "ratio": statistics.median(sites) / statistics.median(singles),
              "noop_single": stats(noop_singles), "noop_site": stats(noop_sites),
              "noop_ratio": statistics.median(noop_sites) / statistics.median(noop_singles)}
    print(line("fab provision of a fresh host", result["single"]))
    print(line("fab provision of a fresh site on 2 hosts", result["site"]))
    print(line("no-op fab provision of the host", result["noop_single"]))
    print(line("no-op fab provision of the site", result["noop_site"]))
    print(f"  site / host, medians of this run: fresh {result['ratio']:.2f}x, no-op "
          f"{result['noop_ratio']:.2f}x (targets: at most {CLUSTER_TARGET}x)")
    return result


def rolling() -> dict:
    repo, git = app_clone("rolling-app")
    first, second, third = SANDBOX_SUBNET.split(".")
    site = Cluster(name=f"{SANDBOX_NAME[:3]}r", members=tuple(ROLLING_SITE),
                   subnet=f"{first}.{int(second) + 4}.{third}")
    deploys, controls = [], []
    print(f"\nRolling deploys of a site on {len(ROLLING_SITE)} hosts, each under {RATE:g} "
          f"requests/s through its lb, and as long again with no deploy ({SETTLE:g} s after it):")
    try:
        info = site.up(fresh=True)
        inventory = WORK / "rolling.yaml"
        inventory.write_text(json.dumps({"fabstack": {"hosts": {  # JSON is YAML
            name: {"ssh": member.alias, "private": member.ip, "roles": ROLLING_SITE[name]}
            for name, member in info.members.items()}}}))
        env = dict(os.environ, FABRIC_FABSTACK_ENV_FILE=str(write_settings(
            info, WORK / "rolling.env", DEPLOY_REPO=str(repo))))
        fab = [FAB, "-S", str(info.ssh_config), "-f", str(inventory)]
        run([*fab, "provision"], env)
        run([*fab, "deploy"], env)
        lb = info.members["lb"].ip

        def release(n: int) -> tuple[float, str]:
            (repo / "example" / "bench-release.txt").write_text(f"{n} {time.time()}\n")
            subprocess.run([*git, "add", "-A"], check=True)
            subprocess.run([*git, "commit", "-qm", f"bench rolling release {n}"], check=True)
            return run(aside([*fab, "deploy"]), env)

        for n in range(ROLLING_RUNS):
            time.sleep(-(time.time() - 1.5) % 60)  # to 1.5 s past a minute's turn (deploy's)
            figures = under_stream(lb, lambda n=n: release(n))
            deploys.append(figures)
            time.sleep(SETTLE)
            control = under_stream(lb, None, figures["wall"])
            controls.append(control)
            print(f"  rolling deploy: {figures['wall']:6.2f} s, {figures['round_trips']} SSH "
                  f"round trips, {figures['sent']} requests, {figures['failed']} failed, worst "
                  f"{figures['worst'] * 1000:.0f} ms; with no deploy: {control['failed']} "
                  f"failed, worst {control['worst'] * 1000:.0f} ms"
                  + (f" {figures['errors']}" if figures["errors"] else ""), flush=True)
    finally:
        site.down()
    return {"rate": RATE, "hosts": len(ROLLING_SITE), "during": spread(deploys),
            "quiet": spread(controls),
            "rolling": {**stats([f["wall"] for f in deploys]),
                        "round_trips": sorted({f["round_trips"] for f in deploys}),
                        "runs": len(deploys)}}


# -- the README's block ------------------------------------------------------------------

def targets(results: dict) -> list[str]:
    """Each target of issues 6 and 11 beside the figure this run measured."""
    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    out = []
    if "noop" in results:
        r = results["noop"]
        by = {c["tool"]: c for c in r["converge"]}
        ours, forced = by["fabstack"], by["fabstack, upgrade check forced"]
        out.append(f"no-op `fab provision` <= {NOOP_TARGET:g} s: median {ours['median']:.3f} s"
                   f" (worst {ours['max']:.3f} s), with its upgrade check forced "
                   f"{forced['median']:.3f} s: {verdict(ours['median'] <= NOOP_TARGET)}")
        for name, goal in (("pyinfra", PYINFRA_TARGET), ("Ansible", ANSIBLE_TARGET)):
            if name in by:
                peer = by[name]["median"]
                out.append(f"{name} >= {goal}x ours: x{peer / ours['median']:.1f} of ours as "
                           f"it runs, x{peer / forced['median']:.1f} of ours with its upgrade "
                           "check forced (judged on this one: the peer checks on every run): "
                           f"{verdict(peer >= goal * forced['median'])}")
        out.append(f"redeploy of the current release <= {REDEPLOY_TARGET:g} s: median "
                   f"{r['redeploy']['median']:.3f} s: "
                   f"{verdict(r['redeploy']['median'] <= REDEPLOY_TARGET)}")
    if "deploy" in results:
        d = results["deploy"]
        during, quiet = d["during"], d["quiet"]
        out.append(f"0 failed requests during deploys and rollbacks (at {d['rate']:g} "
                   f"requests/s): {during['failed']} of {during['sent']}: "
                   f"{verdict(during['failed'] == 0)}")
        median = quiet["median"]
        out.append(f"worst request during them <= {LATENCY_TARGET}x the median with no deploy: "
                   f"{during['worst'] * 1000:.0f} ms vs {median * 1000:.1f} ms = "
                   f"x{during['worst'] / median:.1f}: "
                   f"{verdict(during['worst'] <= LATENCY_TARGET * median)} (the worst of as many "
                   f"requests with no deploy: {quiet['worst'] * 1000:.0f} ms = "
                   f"x{quiet['worst'] / median:.1f})")
        for kind, goal in (("deploy", DEPLOY_TARGET), ("requirement", REQ_DEPLOY_TARGET),
                           ("rollback", ROLLBACK_TARGET)):
            if kind in d:
                what = KINDS[kind]
                out.append(f"{what} <= {goal:g} s: median {d[kind]['median']:.2f} s "
                           f"({', '.join(map(str, d[kind]['round_trips']))} SSH round trips): "
                           f"{verdict(d[kind]['median'] <= goal)}")
    if "fresh" in results:
        f = results["fresh"]
        out.append(f"fresh `fab provision` <= {FRESH_TARGET}x one `apt-get install` of its "
                   f"packages: {f['provision']['median']:.1f} s / {f['apt_get']['median']:.1f} s"
                   f" = {f['ratio']:.2f}x: {verdict(f['ratio'] <= FRESH_TARGET)} (against one "
                   "`apt-get install` of its packages and the security upgrades it installs: "
                   f"{f['provision']['median']:.1f} s / "
                   f"{f['apt_get_upgrades']['median']:.1f} s = {f['ratio_upgrades']:.2f}x)")
    if "cluster" in results:
        k = results["cluster"]
        for what, ratio, site, single in (
                ("fresh", k["ratio"], k["site"], k["single"]),
                ("no-op", k["noop_ratio"], k["noop_site"], k["noop_single"])):
            out.append(f"{what} `fab provision` of a site on 2 hosts <= {CLUSTER_TARGET}x one "
                       f"host's: {site['median']:.2f} s / {single['median']:.2f} s = "
                       f"{ratio:.2f}x: {verdict(ratio <= CLUSTER_TARGET)}")
    if "rolling" in results:
        r = results["rolling"]
        during, quiet = r["during"], r["quiet"]
        out.append(f"0 failed requests through the lb during rolling deploys (at {r['rate']:g} "
                   f"requests/s): {during['failed']} of {during['sent']}: "
                   f"{verdict(during['failed'] == 0)}; the rolling deploy took "
                   f"{r['rolling']['median']:.2f} s (median), its worst request "
                   f"{during['worst'] * 1000:.0f} ms against {quiet['worst'] * 1000:.0f} ms with "
                   "no deploy (no target set)")
    return out


def load(section: dict) -> str:
    """The machine's load average (1 min) as the section began and ended, when recorded."""
    if "load" not in section:
        return ""
    before, after = section["load"]
    return f", load average {before:.2f} before, {after:.2f} after"


def table(results: dict) -> str:
    rows = ["| what | median | min | max | vs ours | empty run | notes |",
            "| --- | --- | --- | --- | --- | --- | --- |"]

    def row(what, s, ratio="", notes="", empty=None):
        rows.append(f"| {what} | {s['median']:.3f} s | {s['min']:.3f} s | {s['max']:.3f} s | "
                    f"{ratio} | {f'{empty:.3f} s' if empty is not None else ''} | {notes} |")

    notes = []
    if "noop" in results:
        r = results["noop"]
        for c in r["converge"]:
            name = {"fabstack": "`fab provision`",
                    "fabstack, upgrade check forced": "`fab provision`, upgrade check forced"
                    }.get(c["tool"], f"{c['tool']} {c['version']}")
            row(f"no-op converge: {name}", c, "1" if c["tool"] == "fabstack" else
                f"x{c['ratio']:.1f}", f"changed per run: {', '.join(map(str, c['changed']))}"
                + (f"; {', '.join(map(str, r['round_trips']))} SSH round trips"
                   if c["tool"] == "fabstack" else ""),
                c["empty"]["median"] if c["empty"] else None)
        row("no-op converge: `fab provision`, runs back to back (no peer run between)",
            r["alone"], "", "the same command, on a host no other tool has just run on")
        row("`fab deploy` of the release already current", r["redeploy"], "",
            f"{', '.join(map(str, r['redeploy']['round_trips']))} SSH round trips")
        row("SSH floor: `ssh host true`", r["ssh_floor"])
        row("`fab --list`: Python + Fabric start-up, no SSH", r["fab_startup"])
        notes.append(f"noop: {r['rounds']} rounds, {r['date']}{load(r)}")
        exposure = ", ".join(f"{u} {e}" for u, e in r["exposure"].items())
    if "deploy" in results:
        d = results["deploy"]
        for kind, what in KINDS.items():
            if kind in d:
                row(f"{what}, under {d['rate']:g} requests/s", d[kind], "",
                    f"{', '.join(map(str, d[kind]['round_trips']))} SSH round trips")
        for name, r in (("requests during them", d["during"]),
                        ("as many requests with no deploy (the controls)", d["quiet"])):
            rows.append(f"| {name} | {r['median'] * 1000:.1f} ms | | {r['worst'] * 1000:.0f} ms "
                        f"| | | {r['sent']} sent, {r['failed']} failed, 99th percentile "
                        f"{r['p99'] * 1000:.1f} ms |")
        counts = ", ".join(f"{d[kind]['runs']} {kind}" for kind in KINDS if kind in d)
        notes.append(f"deploy: {counts}, {d['date']}{load(d)}")
    if "fresh" in results:
        f = results["fresh"]
        row("`fab provision` of a fresh host", f["provision"], "1",
            "with the settings a user starts with; its system upgrade (the first floor below "
            "has none, the second the same): "
            + "; ".join(sorted(set(f["upgrades"]))))
        row(f"floor: one `apt-get install` of its {len(f['packages'])} packages", f["apt_get"],
            f"x{1 / f['ratio']:.2f}")
        row(f"floor: one `apt-get install` of its {len(f['packages'])} packages and the "
            "pending security upgrades", f["apt_get_upgrades"], f"x{1 / f['ratio_upgrades']:.2f}",
            "the same work as a first provision's apt runs: security upgrades named: "
            + ", ".join(map(str, sorted(set(f["floor_upgrades"])))))
        notes.append(f"fresh: {f['provision']['runs']} hosts each, {f['date']}{load(f)}")
    if "cluster" in results:
        k = results["cluster"]
        row("cluster: `fab provision` of a fresh host", k["single"], "1", "beside the site")
        row("cluster: `fab provision` of a fresh site on 2 hosts at once (app: lb, web, "
            "worker; data: db, redis)", k["site"], f"x{k['ratio']:.2f}")
        row("cluster: no-op `fab provision` of that host", k["noop_single"], "1")
        row("cluster: no-op `fab provision` of that site", k["noop_site"],
            f"x{k['noop_ratio']:.2f}")
        notes.append(f"cluster: {k['single']['runs']} hosts and sites, {k['noop_site']['runs']} "
                     f"no-op runs each, {k['date']}{load(k)}")
    if "rolling" in results:
        r = results["rolling"]
        row(f"rolling: `fab deploy` of a new commit to a site on {r['hosts']} hosts (lb; web1, "
            f"web2; worker; data), under {r['rate']:g} requests/s through the lb", r["rolling"],
            "", f"{', '.join(map(str, r['rolling']['round_trips']))} SSH round trips on all "
            "hosts")
        for name, s in (("rolling: requests during them", r["during"]),
                        ("rolling: as many requests with no deploy (the controls)", r["quiet"])):
            rows.append(f"| {name} | {s['median'] * 1000:.1f} ms | | {s['worst'] * 1000:.0f} ms "
                        f"| | | {s['sent']} sent, {s['failed']} failed, 99th percentile "
                        f"{s['p99'] * 1000:.1f} ms |")
        notes.append(f"rolling: {r['rolling']['runs']} rolling deploys, {r['date']}{load(r)}")
    machines = sorted({r["machine"] for r in results.values()})
    text = "\n".join(rows) + "\n\n"
    if "noop" in results:
        r = results["noop"]
        text += (f"Every no-op run of every tool covered the {r['resources']} resources "
                 "`fab provision` declares (checked on its report, pyinfra's results and "
                 "Ansible's recap). \"Empty run\" is each tool's fixed cost: start-up, one "
                 "connection and `true` on the host (`fab -- true`, `pyinfra exec -- true`, a "
                 "play of one `raw` task). The peers simulate (pyinfra) or run (Ansible) an "
                 "upgrade on every run; `fab provision` skips the simulation while dpkg's "
                 "status and the apt lists are as they were at the last one that found nothing "
                 "to upgrade, so it is shown both ways.\n\n")
        text += f"`systemd-analyze security` exposure (lower is safer): {exposure}.\n\n"
    lines = targets(results)
    if lines:
        text += "Targets (issues 6, 11, 12 and 13):\n\n" + "".join(f"- {t}\n" for t in lines) + "\n"
    text += (f"Measured on {'; '.join(machines)}; {'; '.join(notes)}. Regenerate with "
             "`make bench` (`python bench/run.py noop|deploy|fresh|cluster|rolling` for one "
             "section).\n")
    return text


def write_readme(results: dict) -> None:
    text = README.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    README.write_text(text[:start] + "\n" + table(results) + text[end:])


def main(sections: list[str]) -> None:
    unknown = set(sections) - set(FORMATS)
    if unknown:
        sys.exit(f"unknown section(s): {', '.join(sorted(unknown))} ({', '.join(FORMATS)})")
    sections = sections or list(FORMATS)
    WORK.mkdir(parents=True, exist_ok=True)
    kept = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    # sections measured by a bench that counted otherwise are not shown beside this run's
    results = {name: r for name, r in kept.items() if r.get("format") == FORMATS.get(name)}
    stamp = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine()}
    target = bench_host() if {"noop", "deploy"} & set(sections) else None
    for name in sections:
        before = os.getloadavg()[0]
        result = {"noop": lambda: noop(target), "deploy": lambda: deploy(target),
                  "fresh": fresh, "cluster": cluster, "rolling": rolling}[name]()
        load = [round(before, 2), round(os.getloadavg()[0], 2)]
        results[name] = {**result, **stamp, "load": load, "format": FORMATS[name]}
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    write_readme(results)
    measured = {name: results[name] for name in sections}
    print("\ntargets, from this run:\n" + "".join(f"  {t}\n" for t in targets(measured))
          + f"results: {RESULTS.relative_to(REPO)}; README block regenerated")


if __name__ == "__main__":
    main(sys.argv[1:])
