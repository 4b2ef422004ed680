#!/usr/bin/env python3
"""Runs the linkgate benchmark: every contender, every scenario, alternating
rounds; writes bench/results.json, BENCHMARKS.md and bench/ratios.svg.

Called by bench/run, which installs the tools, builds linkgate and makes the
certificate. Everything talks to 127.0.0.1 only, and every process it starts
is stopped before it returns.
"""
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
# Where bench/run's `cargo build --release` put linkgate and h3load.
TARGET = Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")
RUN = Path(os.environ["BENCH_RUN_DIR"])
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
DURATION = int(os.environ.get("BENCH_DURATION", "6"))
IDLE_CONNS = int(os.environ.get("BENCH_IDLE_CONNS", "10000"))
FULL_CONNS = int(os.environ.get("BENCH_FULL_CONNS", "12000"))
BURSTS, BURST_S, PAUSE_S = 5, 1, 2.5
HOST = "localhost"
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

CONTENDERS = ["linkgate", "nginx", "haproxy", "caddy"]
# A/B mode (bench/run with BENCH_BASELINE=REV): linkgate against the binary
# built from REV, nothing else; BENCHMARKS.md is left alone.
BASELINE_BIN = os.environ.get("BENCH_BASELINE_BIN")
BASELINE_CONF = os.environ.get("BENCH_BASELINE_CONF")
SCENARIOS = {
    "a": "HTTP/1.1 keep-alive, 64 connections, open pixel",
    "b": "HTTP/2, 64 connections x 10 streams, open pixel",
    "c": "returning client: new TLS connection per request, resumed TLS 1.3 (wrk reuses its session), click redirect",
    "d": f"{IDLE_CONNS} idle TLS connections held open",
    "e": "10 MB streamed response, 4 connections",
    "g": "HTTP/1.1 keep-alive, 64 connections, open pixel, https upstream (certificate verified)",
    "h": f"bursts: {BURSTS} x ({BURST_S} s of (g)'s load, then {PAUSE_S} s idle), https upstream: pools shrink and re-handshake",
    "f": f"first click: {FULL_CONNS} clients, one new TLS connection and one request each, full handshake (h2load never resumes), click redirect",
    "i": "HTTP/3 over QUIC, 64 connections x 10 streams, open pixel (h3load)",
}
# Scenarios whose work is the TLS handshake: each contender logs whether each
# one resumed a session, and (f) fails the run if any did.
HANDSHAKE = ["c", "f"]
FULL = ["f"]
# Scenarios forwarding to the upstream over https, verified for the stand-in
# provider name (as linkgate forwards to https://sendgrid.net in production).
HTTPS_UPSTREAM = ["g", "h"]
PROVIDER = "provider.test"
UPSTREAM_TLS_PORT = None  # set in main()
# Scenarios over HTTP/3: each contender serves QUIC on the UDP port of the
# same number as its TCP one, and a peer whose build has no HTTP/3 sits out.
HTTP3 = ["i"]


def free_port():
    """A loopback port free for TCP and for UDP: (i) serves QUIC on the UDP port of the same number."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                    u.bind(("127.0.0.1", port))
                    return port
            except OSError:
                continue


def render(template, port, upstream_port, out, conf=None, extra=None):
    text = ((conf or BENCH / "conf") / template).read_text()
    for key, value in (extra or {}).items():
        text = text.replace(key, value)
    text = text.replace("@RUN@", str(RUN)).replace("@PORT@", str(port)).replace("@UPSTREAM_PORT@", str(upstream_port))
    out.write_text(text)
    return out


# What each contender writes, in the handshake scenarios only, to say whether
# a connection resumed a TLS session (a log line per request: cheap next to a
# handshake, and off in every other scenario). linkgate counts it itself.
RESUMPTION_LOG = {
    "nginx": ("@ACCESS_LOG@", "access_log @RUN@/nginx-access.log resumed;", "access_log off;"),
    "haproxy": ("@ACCESS_LOG@", 'log stdout format raw local0\n    log-format "resumed=%[ssl_fc_is_resumed]"', "no log"),
    "caddy": ("@ACCESS_LOG@", "log {\n        output file @RUN@/caddy-access.log\n        format json\n    }", ""),
}


def wait_port(port, proc, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout}s")


def tree(pid):
    """pid and all its descendants."""
    pids, frontier = [pid], [pid]
    while frontier:
        p = frontier.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            kids = []
        for k in map(int, kids):
            pids.append(k)
            frontier.append(k)
    return pids


def cpu_seconds(pid):
    """(user, kernel) CPU seconds of pid and its descendants: utime and stime from /proc."""
    user = kernel = 0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            user += int(fields[11])
            kernel += int(fields[12])
        except (OSError, IndexError):
            pass
    return user / TICK, kernel / TICK


def memory(pid, key):
    """Sum of a /proc/PID/status field (VmRSS, VmHWM) over the tree, in bytes."""
    total = 0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def start_contender(name, port, upstream_port, scenario=None):
    env = dict(os.environ)
    log_path = RUN / f"{name}.log"
    log_offset = log_path.stat().st_size if log_path.exists() else 0
    out = open(log_path, "ab")
    admin_port = free_port()
    placeholder, on, off = RESUMPTION_LOG.get(name, ("@ACCESS_LOG@", "", ""))
    extra = {placeholder: on if scenario in HANDSHAKE else off, "@ADMIN_PORT@": str(admin_port)}
    if scenario in HTTPS_UPSTREAM:
        upstream_port = UPSTREAM_TLS_PORT
    extra.update(upstream_placeholders(name, upstream_port, scenario in HTTPS_UPSTREAM))
    # linkgate: listen.http3 on the https port's number (UDP); Caddy: h3 among its protocols.
    extra["@HTTP3@"] = f'http3 = "127.0.0.1:{port}"' if scenario in HTTP3 else ""
    extra["@PROTOCOLS@"] = "h1 h2 h3" if scenario in HTTP3 else "h1 h2"
    for stale in ("nginx-access.log", "caddy-access.log"):
        (RUN / stale).unlink(missing_ok=True)
    if name in ("linkgate", "baseline"):
        # The baseline with its own configuration: it may not know keys added since.
        conf_dir = Path(BASELINE_CONF) if name == "baseline" and BASELINE_CONF else None
        conf = render("linkgate.toml", port, upstream_port, RUN / f"{name}.toml", conf_dir, extra)
        if scenario in HTTP3 and "http3 =" not in conf.read_text():
            # A baseline's configuration from before the @HTTP3@ placeholder.
            conf.write_text(conf.read_text().replace("[listen]\n", f"[listen]\n{extra['@HTTP3@']}\n", 1))
        env["RUST_LOG"] = "warn"
        binary = BASELINE_BIN if name == "baseline" else TARGET / "release" / "linkgate"
        cmd = [str(binary), "serve", "--config", str(conf)]
    elif name == "nginx":
        conf = render("nginx.conf", port, upstream_port, RUN / "nginx.conf", extra=extra)
        cmd = ["nginx", "-c", str(conf), "-e", str(RUN / "nginx.err")]
    elif name == "haproxy":
        conf = render("haproxy.cfg", port, upstream_port, RUN / "haproxy.cfg", extra=extra)
        cmd = ["haproxy", "-db", "-f", str(conf)]
    elif name == "caddy":
        conf = render("Caddyfile", port, upstream_port, RUN / "Caddyfile", extra=extra)
        env["GOMAXPROCS"] = "2"
        env["HOME"] = str(RUN)
        env["XDG_DATA_HOME"] = str(RUN / "caddy-data")
        env["XDG_CONFIG_HOME"] = str(RUN / "caddy-config")
        cmd = ["caddy", "run", "--config", str(conf), "--adapter", "caddyfile"]
    else:
        raise ValueError(name)
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_port(port, proc)
    except RuntimeError:
        stop(proc)
        log = (RUN / f"{name}.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{name} did not start; its output:\n{log}") from None
    proc.name, proc.admin_port, proc.log_path, proc.log_offset = name, admin_port, log_path, log_offset
    return proc


_HTTP3_ABSENT = {}


def http3_absent(name):
    """Why a peer sits out the HTTP/3 scenarios, or None if it takes part:
    the Debian builds of nginx (1.22, no http_v3_module before 1.25) and
    HAProxy (2.6, built without QUIC) installed by bench/run have none."""
    if name not in _HTTP3_ABSENT:
        reason = None
        if name == "nginx":
            said = subprocess.run(["nginx", "-V"], capture_output=True, text=True, timeout=10).stderr
            version = said.splitlines()[0].split("/")[-1] if said else "?"
            reason = (f"its build (nginx {version}) has no HTTP/3 (`nginx -V` lists no http_v3_module)"
                      if "http_v3_module" not in said else
                      "its build has http_v3_module, but bench/conf/nginx.conf does not configure QUIC yet")
        elif name == "haproxy":
            said = subprocess.run(["haproxy", "-vv"], capture_output=True, text=True, timeout=10).stdout
            version = re.search(r"HAProxy version (\S+)", said)
            reason = (f"its build (HAProxy {version.group(1) if version else '?'}) has no QUIC (`haproxy -vv`: -QUIC)"
                      if "+QUIC" not in said else
                      "its build has QUIC, but bench/conf/haproxy.cfg does not configure it yet")
        _HTTP3_ABSENT[name] = reason
    return _HTTP3_ABSENT[name]


def upstream_placeholders(name, port, https):
    """How each contender names the upstream: plain http, or https with the
    certificate verified against the benchmark's CA for PROVIDER (SNI too)."""
    ca = RUN / "provider-ca.pem"
    if name in ("linkgate", "baseline"):
        url = f"https://{PROVIDER}:{port}" if https else f"http://127.0.0.1:{port}"
        tls = f'connect_to = "127.0.0.1:{port}"\nca_file = "{ca}"' if https else ""
    elif name == "nginx":
        url, tls = ("https://provider_tls" if https else "http://provider"), ""
    elif name == "haproxy":
        url, tls = "", f"ssl verify required ca-file {ca} sni str({PROVIDER}) verifyhost {PROVIDER}" if https else ""
    elif name == "caddy":
        url = f"https://127.0.0.1:{port}" if https else f"127.0.0.1:{port}"
        tls = f"tls_trusted_ca_certs {ca}\n            tls_server_name {PROVIDER}" if https else ""
    else:
        url, tls = "", ""
    return {"@UPSTREAM_URL@": url, "@UPSTREAM_TLS@": tls}


def linkgate_handshakes(proc):
    """(resumed, ok) TLS handshakes linkgate has counted so far, or None
    (a baseline from before the counter, or no admin listener)."""
    try:
        with socket.create_connection(("127.0.0.1", proc.admin_port), timeout=2) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            text = b""
            while chunk := s.recv(65536):
                text += chunk
    except OSError:
        return None
    text = text.decode(errors="replace")
    resumed = re.search(r"^linkgate_tls_handshakes_resumed_total (\d+)", text, re.M)
    ok = re.search(r'^linkgate_tls_handshakes_total\{result="ok"\} (\d+)', text, re.M)
    # The resumed counter is always there (0 before the first); the ok series only after one.
    return (int(resumed.group(1)), int(ok.group(1)) if ok else 0) if resumed else None


def logged_resumption(proc):
    """(resumed, connections) from a stopped peer's log, or None."""
    if proc.name == "nginx":
        path = RUN / "nginx-access.log"
        lines = path.read_text().split() if path.exists() else []
        return sum(1 for x in lines if x == "r"), len(lines)
    if proc.name == "haproxy":
        with open(proc.log_path, "rb") as f:
            f.seek(proc.log_offset)
            flags = re.findall(rb"^resumed=([01])$", f.read(), re.M)
        return sum(1 for x in flags if x == b"1"), len(flags)
    if proc.name == "caddy":
        path = RUN / "caddy-access.log"
        seen = [json.loads(line).get("request", {}).get("tls", {}).get("resumed")
                for line in (path.read_text().splitlines() if path.exists() else []) if line.startswith("{")]
        return sum(1 for x in seen if x), len(seen)
    return None


def stop(proc):
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def percentile(sorted_values, q):
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


def to_ms(value, unit):
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_wrk(port, path, conns, extra=()):
    url = f"https://{HOST}:{port}{path}"
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{DURATION}s", "--latency", "--timeout", "10s", *extra, url]
    return parse_wrk(subprocess.run(cmd, capture_output=True, text=True, timeout=DURATION + 60).stdout)


def parse_wrk(out):
    reqs = re.search(r"(\d+) requests in", out)
    lat = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.M))
    errors = re.search(r"Socket errors: (.*)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)

    def ms(s):
        m = re.match(r"([\d.]+)(us|ms|s)", s)
        return to_ms(*m.groups()) if m else float("nan")

    return {
        "requests": int(reqs.group(1)) if reqs else 0,
        "p50_ms": ms(lat.get("50", "")),
        "p99_ms": ms(lat.get("99", "")),
        "errors": (errors.group(1) if errors else "") + (f" non-2xx/3xx: {non2xx.group(1)}" if non2xx else ""),
        "raw": out,
    }


def run_h2load(port):
    log = RUN / "h2load.log"
    log.unlink(missing_ok=True)
    url = f"https://{HOST}:{port}/wf/open"
    cmd = ["h2load", "-t1", "-c64", "-m10", "-D", str(DURATION), f"--log-file={log}", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=DURATION + 60).stdout
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", out)
    durations = []
    if log.exists():
        for line in log.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3:
                durations.append(int(parts[2]) / 1000.0)  # µs -> ms
    durations.sort()
    proto = re.search(r"Application protocol: (\S+)", out)
    return {
        "requests": int(done.group(2)) if done else 0,
        "p50_ms": percentile(durations, 0.50),
        "p99_ms": percentile(durations, 0.99),
        "errors": (f"failed: {done.group(3)}" if done and done.group(3) != "0" else "")
        + ("" if proto and proto.group(1) == "h2" else " not h2!"),
        "raw": out,
    }


def run_h3load(port):
    """(b)'s load over HTTP/3: bench/h3load, one thread, 64 connections x 10
    streams, the benchmark's certificate trusted (and verified for HOST)."""
    url = f"https://{HOST}:{port}/wf/open"
    cmd = [str(TARGET / "release" / "h3load"), "--ca", str(RUN / "cert.pem"), "-c", "64", "-m", "10",
           "-d", str(DURATION), url]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=DURATION + 60)
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    try:
        got = json.loads(lines[-1]) if lines else {}
    except ValueError:
        got = {}
    if got:
        errors = " ".join(f"{kind}: {got[f'errors_{kind}']}" for kind in ("status", "stream", "timeout", "connect")
                          if got.get(f"errors_{kind}"))
    else:
        errors = f"h3load printed no result (exit {p.returncode}): {' '.join(p.stderr.split())[-300:]}"
    user, kernel = got.get("cpu_user_s") or 0.0, got.get("cpu_kernel_s") or 0.0

    def ms(key):
        return float("nan") if got.get(key) is None else float(got[key])

    return {
        "requests": got.get("requests", 0),
        "seconds": got.get("seconds") or DURATION,
        "p50_ms": ms("p50_ms"),
        "p99_ms": ms("p99_ms"),
        "errors": errors,
        # The generator's own CPU over its measured span, and as a share of its one core.
        "loadgen_cpu_s": user + kernel, "loadgen_user_s": user, "loadgen_kernel_s": kernel,
        "loadgen_share": got.get("cpu_share"),
        "raw": p.stdout + p.stderr,
    }


def run_idle(proc, port):
    base = memory(proc.pid, "VmRSS")
    holder = subprocess.Popen([sys.executable, str(BENCH / "idle.py"), HOST, str(port), str(IDLE_CONNS)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    ready = holder.stdout.readline().split()
    opened = int(ready[1]) if len(ready) == 2 else 0
    time.sleep(1)
    held = memory(proc.pid, "VmRSS")
    holder.stdin.write("\n")
    holder.stdin.flush()
    still = holder.stdout.readline().split()
    still_open = int(still[1]) if len(still) == 2 else 0
    holder.wait(60)
    per_conn = (held - base) / max(1, still_open)
    return {"requests": opened, "opened": opened, "still_open": still_open,
            "rss_base": base, "rss_held": held, "rss_per_conn": per_conn,
            "errors": "" if still_open == IDLE_CONNS else f"only {still_open}/{IDLE_CONNS} held"}


def run_bursts(port):
    """(g)'s load in bursts with idle pauses between, so the upstream pools
    shrink (or not) and connections are made again, TLS handshakes included."""
    bursts = []
    for i in range(BURSTS):
        if i:
            time.sleep(PAUSE_S)
        url = f"https://{HOST}:{port}/wf/open"
        cmd = ["wrk", "-t1", "-c64", f"-d{BURST_S}s", "--latency", "--timeout", "10s", url]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=BURST_S + 60).stdout
        bursts.append(parse_wrk(out))
    return {
        "requests": sum(b["requests"] for b in bursts),
        "seconds": BURSTS * BURST_S,
        "p50_ms": statistics.median(b["p50_ms"] for b in bursts),
        "p99_ms": max(b["p99_ms"] for b in bursts),
        "errors": " ".join(b["errors"] for b in bursts if b["errors"]),
        "raw": "\n".join(b["raw"] for b in bursts),
    }


def run_full_handshakes(port):
    """FULL_CONNS clients, each with one connection and one request: h2load
    keeps no session between its clients, so every handshake is full."""
    log = RUN / "h2load-full.log"
    log.unlink(missing_ok=True)
    url = f"https://{HOST}:{port}/ls/click"
    cmd = ["h2load", "--h1", "-t1", f"-n{FULL_CONNS}", f"-c{FULL_CONNS}", f"--log-file={log}", url]
    t0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600).stdout
    seconds = time.time() - t0
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", out)
    durations = sorted(int(parts[2]) / 1000.0 for parts in (line.split() for line in
                       (log.read_text().splitlines() if log.exists() else [])) if len(parts) >= 3)
    return {
        "requests": int(done.group(2)) if done else 0,
        "seconds": seconds,
        # Per request as h2load times it (its --log-file), as in (b).
        "p50_ms": percentile(durations, 0.50),
        "p99_ms": percentile(durations, 0.99),
        "errors": f"failed: {done.group(3)}" if done and done.group(3) != "0" else "",
        "raw": out,
    }


def tls_offer(port):
    """What a default OpenSSL client (as wrk and h2load are) negotiates: version, suite, key exchange."""
    try:
        r = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", HOST, "-brief"],
                           input="", capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "?"
    said = r.stdout + r.stderr
    version = re.search(r"Protocol version: (\S+)", said)
    suite = re.search(r"Ciphersuite: (\S+)", said)
    group = re.search(r"(?:Server Temp Key|Negotiated TLS1.3 group): ([^\n]+)", said)
    return ", ".join(m.group(1).strip() for m in (version, suite, group) if m) or "?"


def run_scenario(scenario, proc, port):
    if scenario == "a":
        return run_wrk(port, "/wf/open", 64)
    if scenario == "b":
        return run_h2load(port)
    if scenario == "c":
        return run_wrk(port, "/ls/click", 64, ["-H", "Connection: close"])
    if scenario == "d":
        return run_idle(proc, port)
    if scenario == "e":
        return run_wrk(port, "/big", 4)
    if scenario == "f":
        return run_full_handshakes(port)
    if scenario == "g":
        return run_wrk(port, "/wf/open", 64)
    if scenario == "h":
        return run_bursts(port)
    if scenario == "i":
        return run_h3load(port)
    raise ValueError(scenario)


PROFILED = ["a", "b", "c", "i"]

# Self time is grouped by what it is spent on: the crate a Rust symbol comes
# from, or the kind of C or kernel function. First match wins.
USER_GROUPS = [
    ("allocator (glibc malloc/free)", r"^(_int_malloc|_int_free|malloc|free|cfree|realloc|calloc|unlink_chunk|malloc_consolidate|tcache|__libc_malloc|__libc_free)"),
    ("memory copies (memcpy/memmove)", r"^__(memmove|memcpy|memset|memcmp)"),
    # Before aws-lc-rs, whose unanchored pattern would take a quinn function named `..._dec_...`.
    ("quinn and h3 (QUIC, HTTP/3)", r"^<?(quinn|quinn_proto|quinn_udp|h3|h3_quinn)::"),
    ("aws-lc-rs (AES-GCM, ECDSA, X25519, SHA)", r"(aws_lc|aead_|gcm_|aes_|sha256|sha512|ecp_nistz|p256|x25519|fiat_|bn_|ec_|ecdsa)"),
    ("rustls and tokio-rustls", r"^<?(rustls|tokio_rustls)::"),
    ("hyper-util (I/O adapters, ACME client)", r"^<?hyper_util::"),
    ("hyper and httparse (HTTP/1 and HTTP/2 codecs)", r"^<?(hyper|httparse|h2)::"),
    ("http (header maps, URIs)", r"^<?http::"),
    ("tokio (scheduler, I/O driver, timers)", r"^<?(tokio|mio)::"),
    ("linkgate", r"^<?linkgate::"),
]
KERNEL_GROUPS = [
    ("kernel: scheduler, wake-ups, interrupts", r"(schedule|finish_task_switch|switch_|wake|ttwu|enqueue|dequeue|update_curr|pick_next|psi_|_raw_spin|irq)"),
    ("kernel: epoll", r"(epoll|^ep_)"),
    # Before TCP/IP, whose pattern would take udp_sendmsg for its "send".
    ("kernel: UDP (QUIC's datagrams, both ends)", r"(udp|^__skb_gso|gso_segment|^skb_gro|_gro_)"),
    ("kernel: TCP/IP over loopback (both ends)", r"(tcp|^ip_|ipv4|skb|^net_|napi|^dev_|sock|inet|recv|send|loopback|netif|^nf_|csum|process_backlog|softirq)"),
]


def component(dso, sym):
    if dso.startswith("[kernel"):
        for name, pattern in KERNEL_GROUPS:
            if re.search(pattern, sym):
                return name
        return "kernel: other (syscall entry and exit, clocks, memory)"
    for name, pattern in USER_GROUPS:
        if re.search(pattern, sym):
            return name
    return "other user space (std, libc, futures, bytes)"


def profile(scenario, upstream_port):
    """Runs the scenario on a fresh linkgate under `perf record -e cpu-clock`;
    returns self time grouped by component and the top user-space functions.
    Tried twice: perf now and then records nothing on this VM."""
    error = ""
    for _attempt in range(2):
        port = free_port()
        proc = start_contender("linkgate", port, upstream_port, scenario)
        try:
            result = profile_once(proc, scenario, port)
        finally:
            stop(proc)
        if result.get("groups"):
            return result
        error = result["error"]
    return {"groups": {}, "top": [], "error": error}


def profile_once(proc, scenario, port):
    data = RUN / f"perf-{scenario}.data"
    data.unlink(missing_ok=True)
    with open(RUN / f"perf-{scenario}.log", "w") as log:
        rec = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "999", "-p", str(proc.pid),
                                "-o", str(data), "--", "sleep", str(DURATION)],
                               stdout=subprocess.DEVNULL, stderr=log)
        time.sleep(0.5)  # let perf attach before the load starts
        r = run_scenario(scenario, proc, port)
        rec.wait(DURATION + 60)
    rep = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children", "-g", "none", "-q",
                          "--sort", "dso,sym", "--percent-limit", "0"],
                         capture_output=True, text=True, timeout=300)
    groups, top = {}, []
    for line in rep.stdout.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.*\S)", line)
        if not m:
            continue
        pct, dso, sym = float(m.group(1)), m.group(2), m.group(4)
        group = component(dso, sym)
        groups[group] = groups.get(group, 0.0) + pct
        if not dso.startswith("[kernel") and len(top) < 12:
            top.append([pct, sym[:110], group])
    if not groups:
        said = " ".join(((RUN / f"perf-{scenario}.log").read_text() + " " + rep.stderr).split())[-300:]
        return {"error": f"perf recorded nothing (perf record exit {rec.returncode}, {r['requests']} requests): {said}"}
    return {"requests": r["requests"], "groups": groups, "top": top}


def versions():
    def first_line(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"
    return {
        "linkgate": first_line([str(TARGET / "release" / "linkgate"), "--version"]),
        "nginx": first_line(["nginx", "-v"]),
        "haproxy": first_line(["haproxy", "-v"]),
        "caddy": first_line(["caddy", "version"]),
        "wrk": first_line(["wrk", "-v"]),
        "h2load": first_line(["h2load", "--version"]),
        "h3load": first_line([str(TARGET / "release" / "h3load"), "--version"]),
        "openssl": first_line(["openssl", "version"]),
        "rustc": first_line(["rustc", "--version"]),
    }


def machine():
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return {"cpu": model, "cores": os.cpu_count(), "memory_gib": round(int(mem) / 1024 / 1024, 1),
            "kernel": platform.release()}


def crypto_floor():
    def speed(alg, pattern):
        r = subprocess.run(["openssl", "speed", "-seconds", "2", alg], capture_output=True, text=True, timeout=60)
        m = re.search(pattern, r.stdout, re.M)
        return float(m.group(1)) if m else float("nan")
    return {
        "ecdsa_p256_sign_per_s": speed("ecdsap256", r"^\s*256 bits ecdsa \(nistp256\)\s+\S+s\s+\S+s\s+([\d.]+)"),
        "x25519_ops_per_s": speed("ecdhx25519", r"^\s*253 bits ecdh \(X25519\)\s+\S+s\s+([\d.]+)"),
    }


def main():
    global UPSTREAM_TLS_PORT
    upstream_port, UPSTREAM_TLS_PORT = free_port(), free_port()
    render("upstream-nginx.conf", 0, upstream_port, RUN / "upstream.conf",
           extra={"@UPSTREAM_TLS_PORT@": str(UPSTREAM_TLS_PORT)})
    upstream = subprocess.Popen(["nginx", "-c", str(RUN / "upstream.conf"), "-e", str(RUN / "upstream.err")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    results, profiles, tls_seen, absent, work_rows = [], {}, {}, {}, []
    try:
        wait_port(upstream_port, upstream)
        wait_port(UPSTREAM_TLS_PORT, upstream)
        scenarios = [s for s in os.environ.get("BENCH_SCENARIOS", "abcdefghi")]
        contenders = [c for c in os.environ.get("BENCH_CONTENDERS", ",".join(CONTENDERS)).split(",")]
        if BASELINE_BIN:
            contenders = ["linkgate", "baseline"]
        for rnd in range(1, ROUNDS + 1):
            for scenario in scenarios:
                for name in contenders:
                    if scenario in HTTP3 and (why := http3_absent(name)):
                        if name not in absent.setdefault(scenario, {}):
                            absent[scenario][name] = why
                            print(f"  ({scenario}) without {name}: {why}", flush=True)
                        continue
                    port = free_port()
                    proc = start_contender(name, port, upstream_port, scenario)
                    try:
                        if rnd == 1 and name not in tls_seen:
                            # Before the measured run, so its handshake is not counted in it.
                            tls_seen[name] = tls_offer(port)
                        counted0 = linkgate_handshakes(proc) if name in ("linkgate", "baseline") else None
                        user0, kernel0 = cpu_seconds(proc.pid)
                        t0 = time.time()
                        r = run_scenario(scenario, proc, port)
                        elapsed = time.time() - t0
                        user1, kernel1 = cpu_seconds(proc.pid)
                        user, kernel = user1 - user0, kernel1 - kernel0
                        cpu = user + kernel
                        counted1 = linkgate_handshakes(proc) if counted0 else None
                        seconds = r.pop("seconds", DURATION if scenario != "d" else max(elapsed, 1e-9))
                        r.update(contender=name, scenario=scenario, round=rnd, elapsed=elapsed, cpu_s=cpu,
                                 user_s=user, kernel_s=kernel,
                                 peak_rss=memory(proc.pid, "VmHWM"),
                                 rps=r["requests"] / seconds)
                        for key, seconds in (("cpu_per_10k", cpu), ("user_per_10k", user), ("kernel_per_10k", kernel)):
                            r[key] = seconds / r["requests"] * 10000 if r["requests"] else float("nan")
                        raw = r.pop("raw", "")
                        if counted1:
                            r["resumed"], r["handshakes"] = counted1[0] - counted0[0], counted1[1] - counted0[1]
                        if r.get("errors"):
                            print(f"  note: {name} ({scenario}) {r['errors']}", flush=True)
                            (RUN / f"{name}-{scenario}-{rnd}.out").write_text(raw)
                        results.append(r)
                        print(f"round {rnd} scenario {scenario} {name:9s} "
                              + (f"{r['rps']:10.0f} req/s  p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  "
                                 f"cpu {r['cpu_per_10k']:.3f} s/10k  peak {r['peak_rss'] / 2**20:.0f} MiB"
                                 + (f"  h3load {r['loadgen_share']:.0%} of its core" if r.get("loadgen_share") else "")
                                 if scenario != "d" else
                                 f"{r['still_open']} held, {r['rss_per_conn'] / 1024:.1f} KiB/conn"), flush=True)
                    finally:
                        stop(proc)
                    if scenario in HANDSHAKE and "handshakes" not in r and (seen := logged_resumption(proc)):
                        r["resumed"], r["handshakes"] = seen
                    if scenario in HANDSHAKE and "handshakes" in r:
                        print(f"  {name} ({scenario}): {r['resumed']} of {r['handshakes']} TLS connections resumed", flush=True)
                    if scenario in FULL and r.get("resumed"):
                        raise RuntimeError(f"{name} resumed {r['resumed']} of {r['handshakes']} connections in ({scenario}), "
                                           "a full-handshake scenario: it does not measure what it says")
        if BASELINE_BIN and os.environ.get("BENCH_WORK", "1") != "0":
            import work  # noqa: E402 - sibling module
            work_rows = work.measure(sys.modules[__name__], upstream_port, scenarios)
        if "linkgate" in contenders and not BASELINE_BIN and os.environ.get("BENCH_PROFILE", "1") != "0":
            for scenario in [s for s in PROFILED if s in scenarios]:
                profiles[scenario] = prof = profile(scenario, upstream_port)
                print(f"profile of linkgate in ({scenario}): "
                      + (prof.get("error") or ", ".join(f"{g} {v:.0f}%" for g, v in sorted(
                          prof["groups"].items(), key=lambda kv: -kv[1])[:4])), flush=True)
    finally:
        stop(upstream)
    if BASELINE_BIN:
        import report as rep  # noqa: E402 - sibling module
        text = rep.ab(results, os.environ.get("BENCH_BASELINE", "baseline"), ROUNDS)
        if work_rows:
            import work  # noqa: E402 - sibling module
            text += work.table(work_rows)
        (BENCH / "ab.md").write_text(text)
        print(text)
        return
    report = {"machine": machine(), "versions": versions(), "crypto": crypto_floor(), "tls": tls_seen,
              "duration_s": DURATION, "rounds": ROUNDS, "idle_conns": IDLE_CONNS, "results": results,
              "profiles": profiles, "absent": absent}
    (BENCH / "results.json").write_text(json.dumps(report, indent=1, default=str))
    import report as rep  # noqa: E402 - sibling module
    rep.write(report, ROOT / "BENCHMARKS.md", BENCH / "ratios.svg")


if __name__ == "__main__":
    sys.path.insert(0, str(BENCH))
    main()
