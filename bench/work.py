"""Work per request in an A/B run: the user-space instructions (valgrind's
cachegrind) and the system calls (`perf stat`) linkgate spends on one
request of (a) or (b), this tree's build against the baseline's, under a
fixed number of requests.

CPU seconds on this machine drift by ±15% between runs, and the A/B
rounds' ratios for (a) and (b) spread from 0.8 to 1.3 for the same two
binaries. Instructions and system calls per request do not drift: they say
whether a change added work, the timed rounds say what it cost on the day.
Neither counts the cache misses, the scheduler or the kernel's own time.

Called by driver.py in A/B mode; uses its helpers (passed as `d`) to start
the upstream's stand-in and linkgate as the timed rounds do.
"""
import os
import re
import signal
import subprocess
import time
from pathlib import Path

# Two fixed loads: their difference leaves start-up and shutdown out.
FEW, MANY = 2000, 12000
SYSCALL_REQUESTS = 50000


def load(scenario, port, n, conns):
    url = f"https://localhost:{port}/wf/open"
    h1 = [] if scenario == "b" else ["--h1"]
    streams = ["-m10"] if scenario == "b" else []
    cmd = ["h2load", *h1, "-t1", f"-c{conns}", *streams, "-n", str(n), url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200).stdout
    done = re.search(r"(\d+) succeeded, (\d+) failed", out)
    if not done or int(done.group(1)) != n:
        raise RuntimeError(f"h2load did not complete {n} requests: {out[-400:]}")


def start(d, name, upstream_port, wrap=()):
    """linkgate (this tree's or the baseline's) with its bench configuration."""
    conf_dir = Path(d.BASELINE_CONF) if name == "baseline" and d.BASELINE_CONF else None
    port = d.free_port()
    extra = {"@ACCESS_LOG@": "", "@ADMIN_PORT@": str(d.free_port()), "@HTTP3@": ""}
    extra.update(d.upstream_placeholders(name, upstream_port, False))
    conf = d.render("linkgate.toml", port, upstream_port, d.RUN / f"work-{name}.toml", conf_dir, extra)
    binary = d.BASELINE_BIN if name == "baseline" else str(d.ROOT / "target" / "release" / "linkgate")
    proc = subprocess.Popen([*wrap, binary, "serve", "--config", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, RUST_LOG="warn"), start_new_session=True)
    d.wait_port(port, proc, timeout=120)
    return proc, port


def instructions(d, name, scenario, upstream_port, n):
    out = d.RUN / f"cachegrind-{name}-{scenario}-{n}"
    wrap = ["valgrind", "--tool=cachegrind", "--cache-sim=no", f"--cachegrind-out-file={out}"]
    proc, port = start(d, name, upstream_port, wrap)
    try:
        load(scenario, port, n, 16)
    finally:
        # SIGINT: linkgate drains and exits, and valgrind writes its counts.
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=300)
    for line in out.read_text().splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise RuntimeError(f"no summary in {out}")


def syscalls(d, name, scenario, upstream_port):
    proc, port = start(d, name, upstream_port)
    try:
        perf = subprocess.Popen(["perf", "stat", "-x,", "-e", "raw_syscalls:sys_enter", "-p", str(proc.pid)],
                                stderr=subprocess.PIPE, text=True)
        time.sleep(0.3)
        load(scenario, port, SYSCALL_REQUESTS, 64)
        perf.send_signal(signal.SIGINT)
        err = perf.communicate(timeout=60)[1]
    finally:
        d.stop(proc)
    for line in err.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[2].startswith("raw_syscalls"):
            try:
                return float(fields[0]) / SYSCALL_REQUESTS
            except ValueError:
                return None
    return None


def measure(d, upstream_port, scenarios):
    """Rows for the A/B table: (scenario, figure, this tree's, the baseline's)."""
    rows = []
    have_valgrind = subprocess.run(["which", "valgrind"], capture_output=True).returncode == 0
    for s in [s for s in "ab" if s in scenarios]:
        if have_valgrind:
            per = {}
            for name in ("linkgate", "baseline"):
                few = instructions(d, name, s, upstream_port, FEW)
                many = instructions(d, name, s, upstream_port, MANY)
                per[name] = (many - few) / (MANY - FEW)
            rows.append((s, "user-space instructions per request (cachegrind)", per["linkgate"], per["baseline"]))
            print(f"work ({s}): instructions per request {per['linkgate']:,.0f} against {per['baseline']:,.0f}", flush=True)
        calls = {name: syscalls(d, name, s, upstream_port) for name in ("linkgate", "baseline")}
        if None not in calls.values():
            rows.append((s, "system calls per request (perf stat)", calls["linkgate"], calls["baseline"]))
            print(f"work ({s}): system calls per request {calls['linkgate']:.2f} against {calls['baseline']:.2f}", flush=True)
    return rows


def table(rows):
    if not rows:
        return ""
    lines = ["", "Work per request under a fixed load (no drift: see bench/work.py), this tree's against the baseline's:", "",
             "| scenario | figure | ratio | this tree | baseline |", "|---|---|---:|---:|---:|"]
    for s, label, mine, theirs in rows:
        spec = ",.0f" if theirs > 100 else ".2f"
        lines.append(f"| ({s}) | {label} | {mine / theirs:.3f} | {format(mine, spec)} | {format(theirs, spec)} |")
    return "\n".join(lines) + "\n"
