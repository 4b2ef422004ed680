"""Turns bench results into BENCHMARKS.md and an SVG chart of the ratios.

Ratios are computed per round (linkgate's figure divided by the peer's in
the same round) and the median across rounds is reported, so drift of the
machine between rounds cancels out.
"""
import math
import statistics
from html import escape

PEERS = ["nginx", "haproxy", "caddy"]
THROUGHPUT = ["a", "b", "c", "e", "f", "g", "h", "i"]
HANDSHAKE = ["c", "f"]


def floor_us(crypto):
    """µs of one core a TLS 1.3 full handshake costs the server at least, as
    negotiated here (ECDSA P-256 certificate, X25519 key exchange): one
    signature, one key generation and one shared secret."""
    sign, x25519 = crypto.get("ecdsa_p256_sign_per_s"), crypto.get("x25519_ops_per_s")
    if not sign or not x25519 or math.isnan(sign) or math.isnan(x25519):
        return float("nan")
    return 1e6 / sign + 2 * 1e6 / x25519


def share(res, s, c):
    """Resumed share of the TLS connections contender c saw in scenario s, over all rounds."""
    rows = [r for r in res if r["scenario"] == s and r["contender"] == c and "handshakes" in r]
    total = sum(r["handshakes"] for r in rows)
    return sum(r["resumed"] for r in rows) / total if total else None


def med(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(values) if values else float("nan")


def by(results, scenario, contender, key):
    return [r[key] for r in results if r["scenario"] == scenario and r["contender"] == contender and key in r]


def per_round(results, scenario, key, peer):
    """Median over rounds of linkgate[key] / peer[key]; peer may be 'best-high' or 'best-low'."""
    ratios = []
    rounds = sorted({r["round"] for r in results if r["scenario"] == scenario})
    for rnd in rounds:
        row = {r["contender"]: r.get(key) for r in results if r["scenario"] == scenario and r["round"] == rnd}
        mine = row.get("linkgate")
        if peer == "best-high":
            theirs = max((row[p] for p in PEERS if row.get(p)), default=None)
        elif peer == "best-low":
            theirs = min((row[p] for p in PEERS if row.get(p)), default=None)
        else:
            theirs = row.get(peer)
        if mine is not None and theirs:
            ratios.append(mine / theirs)
    return med(ratios)


def own_ratio(results, contender, scenario, base, key):
    """Median over rounds of a contender's key in scenario ÷ its own in base, same round."""
    ratios = []
    for rnd in sorted({r["round"] for r in results}):
        mine, theirs = ([r.get(key) for r in results if r["scenario"] == x and r["contender"] == contender
                         and r["round"] == rnd] for x in (scenario, base))
        if mine and theirs and mine[0] is not None and theirs[0]:
            ratios.append(mine[0] / theirs[0])
    return med(ratios)


def http3_notes(report, res, s, contenders):
    """Under (i)'s table: QUIC against each contender's own HTTP/2 in (b),
    the load generator's own CPU, and the peers that sat out."""
    lines = []
    ran = [c for c in contenders if by(res, s, c, "rps")]
    if any(by(res, "b", c, "rps") for c in ran):
        lines += ["", "QUIC against TCP: each contender's (i) ÷ its own HTTP/2 in (b), same load, same round "
                  "(median of per-round ratios; CPU per request above 1 is what QUIC costs more).", "",
                  "| proxy | CPU per request (i) ÷ (b) | user-space CPU (i) ÷ (b) | kernel CPU (i) ÷ (b) | requests/s (i) ÷ (b) |", "|---|---:|---:|---:|---:|"]
        for c in ran:
            lines.append(f"| {c} | {fmt(own_ratio(res, c, s, 'b', 'cpu_per_10k'), '.2f')} | "
                         f"{fmt(own_ratio(res, c, s, 'b', 'user_per_10k'), '.2f')} | "
                         f"{fmt(own_ratio(res, c, s, 'b', 'kernel_per_10k'), '.2f')} | "
                         f"{fmt(own_ratio(res, c, s, 'b', 'rps'), '.2f')} |")
    shares = {c: med(by(res, s, c, "loadgen_share")) for c in ran}
    if any(not math.isnan(v) for v in shares.values()):
        lines += ["", "The load generator, h3load (one thread): its own CPU (getrusage) over its measured run, as a "
                  "share of one core, and per 10,000 requests — "
                  + "; ".join(f"against {c}: {fmt(v, '.0%')}, "
                              f"{fmt(med([r['loadgen_cpu_s'] / r['requests'] * 1e4 for r in res if r['scenario'] == s and r['contender'] == c and r.get('requests')]), '.3f')} s"
                              for c, v in shares.items())
                  + ". Near 100%, h3load filled its core: requests/s are then its limit as much as the proxy's, "
                  "while CPU per request still compares the proxies."]
    absent = report.get("absent", {}).get(s, {})
    if absent:
        lines += ["", "Not in (i): " + "; ".join(f"{c}: {why}" for c, why in absent.items()) + "."]
    return lines


def ab(results, baseline, rounds):
    """The A/B table: this tree's linkgate ÷ the baseline's, per figure, as
    the median of per-round ratios, with the per-round ratios beside it."""
    lines = [f"# A/B: this tree's linkgate ÷ linkgate at {baseline}", "",
             f"{rounds} rounds, the two alternating within each round; median of per-round ratios "
             "(requests/s: higher is better; CPU, p99, memory: lower is better).", "",
             "| scenario | figure | ratio | per round |", "|---|---|---:|---|"]
    for s in sorted({r["scenario"] for r in results}):
        figures = [("rss_per_conn", "memory per idle connection")] if s == "d" else [
            ("rps", "requests/s"), ("cpu_per_10k", "CPU per request"), ("p50_ms", "p50 latency"),
            ("p99_ms", "p99 latency")]
        for key, label in figures:
            each = []
            for rnd in sorted({r["round"] for r in results if r["scenario"] == s}):
                row = {r["contender"]: r.get(key) for r in results if r["scenario"] == s and r["round"] == rnd}
                if row.get("linkgate") is not None and row.get("baseline"):
                    each.append(row["linkgate"] / row["baseline"])
            lines.append(f"| ({s}) | {label} | {fmt(med(each), '.3f')} | "
                         + " ".join(fmt(v, '.2f') for v in each) + " |")
    return "\n".join(lines) + "\n"


def fmt(v, spec):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def write(report, md_path, svg_path):
    res = report["results"]
    scenarios = sorted({r["scenario"] for r in res})
    contenders = [c for c in ["linkgate", *PEERS] if any(r["contender"] == c for r in res)]
    from driver import SCENARIOS  # noqa: E402

    lines = [
        "# Benchmarks",
        "",
        "Generated by `bench/run` — do not edit by hand. linkgate against nginx, HAProxy and Caddy doing",
        "the same job on the same machine in the same run: TLS in (ECDSA P-256 certificate), Host set",
        "to the branded name, forward over keep-alive HTTP/1.1 to one shared upstream, stream the answer",
        "back. Configurations: `bench/conf/`. Method: `bench/README.md`.",
        "",
        "## Machine",
        "",
        f"- CPU: {report['machine']['cpu']}, {report['machine']['cores']} cores, "
        f"{report['machine']['memory_gib']} GiB, kernel {report['machine']['kernel']}",
        f"- Crypto floor (`openssl speed`, one core): ECDSA P-256 {fmt(report['crypto']['ecdsa_p256_sign_per_s'], ',.0f')} signs/s, "
        f"X25519 {fmt(report['crypto']['x25519_ops_per_s'], ',.0f')} ops/s. A TLS 1.3 full handshake as negotiated here costs "
        "the server one ECDSA P-256 signature, one X25519 key generation and one X25519 shared secret; counting the "
        f"key generation as one more X25519 operation, that is **{fmt(floor_us(report['crypto']), '.0f')} µs of one core** "
        "per handshake, the crypto floor below. (A client offering the hybrid X25519MLKEM768 share "
        "adds an ML-KEM-768 encapsulation; the load generators' OpenSSL 3.0 offers none, see the negotiated key exchange below.) "
        "A resumed handshake needs no signature.",
        "- TLS as each contender negotiated it with a default OpenSSL client (as wrk and h2load are): "
        + "; ".join(f"{c}: {v}" for c, v in report.get("tls", {}).items()) if report.get("tls") else
        "- TLS as negotiated: not recorded in this run.",
        "- Versions: " + "; ".join(f"{k}: `{v}`" for k, v in report["versions"].items()),
        f"- {report['rounds']} rounds, contenders alternating within each round; {report['duration_s']} s per "
        f"throughput run; {report['idle_conns']} connections in (d). Load generators (wrk, h2load, h3load, Python) share "
        "the 2 cores with the proxy and the upstream, so CPU seconds per 10,000 requests (utime+stime of the "
        "proxy's processes) is the fairest efficiency figure.",
        "",
        "## Results (medians over rounds)",
        "",
    ]
    for s in scenarios:
        lines += [f"### ({s}) {SCENARIOS.get(s, s)}", ""]
        # Only those that ran it ((i) leaves out the peers without HTTP/3).
        ran = [c for c in contenders if any(r["scenario"] == s and r["contender"] == c for r in res)]
        if s == "d":
            lines += ["| proxy | connections held | RSS per idle connection | peak RSS |", "|---|---:|---:|---:|"]
            for c in ran:
                lines.append(f"| {c} | {fmt(med(by(res, s, c, 'still_open')), '.0f')} | "
                             f"{fmt(med(by(res, s, c, 'rss_per_conn')) / 1024, '.1f')} KiB | "
                             f"{fmt(med(by(res, s, c, 'peak_rss')) / 2**20, '.0f')} MiB |")
        else:
            head = "| proxy | requests/s | p50 | p99 | CPU s / 10k req | peak RSS |"
            rule = "|---|---:|---:|---:|---:|---:|"
            if s in HANDSHAKE:
                head += " TLS connections resumed |"
                rule += "---:|"
            if s == "f":
                head += " CPU per handshake | × crypto floor |"
                rule += "---:|---:|"
            lines += [head, rule]
            for c in ran:
                row = (f"| {c} | {fmt(med(by(res, s, c, 'rps')), ',.0f')} | "
                       f"{fmt(med(by(res, s, c, 'p50_ms')), '.2f')} ms | {fmt(med(by(res, s, c, 'p99_ms')), '.2f')} ms | "
                       f"{fmt(med(by(res, s, c, 'cpu_per_10k')), '.3f')} | "
                       f"{fmt(med(by(res, s, c, 'peak_rss')) / 2**20, '.0f')} MiB |")
                if s in HANDSHAKE:
                    seen = share(res, s, c)
                    row += f" {fmt(None if seen is None else 100 * seen, '.1f')}{'' if seen is None else '%'} |"
                if s == "f":
                    us = med(by(res, s, c, "cpu_per_10k")) * 100
                    row += f" {fmt(us, '.0f')} µs | {fmt(us / floor_us(report['crypto']), '.2f')} |"
                lines.append(row)
        if s == "i":
            lines += http3_notes(report, res, s, contenders)
        notes = sorted({f"{r['contender']}: {r['errors'].strip()}" for r in res if r["scenario"] == s and r.get("errors", "").strip()})
        if notes:
            lines += ["", "Errors seen: " + "; ".join(notes)]
        lines.append("")

    lines += ["## Ratios linkgate ÷ peer (median of per-round ratios)", "",
              "Requests/s: higher is better for linkgate. CPU per request, p99 and memory: lower is better.", "",
              "| scenario | figure | ÷ nginx | ÷ HAProxy | ÷ Caddy | ÷ best peer |", "|---|---|---:|---:|---:|---:|"]
    chart = []
    for s in scenarios:
        figures = [("rss_per_conn", "memory per idle connection", "best-low")] if s == "d" else [
            ("rps", "requests/s", "best-high"), ("cpu_per_10k", "CPU per request", "best-low"), ("p99_ms", "p99 latency", "best-low")]
        for key, label, best in figures:
            vals = [per_round(res, s, key, p) for p in PEERS]
            b = per_round(res, s, key, best)
            lines.append(f"| ({s}) | {label} | " + " | ".join(fmt(v, '.2f') for v in vals) + f" | {fmt(b, '.2f')} |")
            if key != "p99_ms":
                chart.append((f"({s}) {label}", vals, key == "rps"))
    lines.append("")
    lines += ["![ratios](bench/ratios.svg)", "", "## Targets", ""]
    checks = []
    for s in [x for x in ["a", "b"] if x in scenarios]:
        checks.append((f"({s}) requests/s ≥ 1.2 × best peer", per_round(res, s, "rps", "best-high"), lambda v: v >= 1.2))
        checks.append((f"({s}) CPU per request ≤ 0.8 × best peer", per_round(res, s, "cpu_per_10k", "best-low"), lambda v: v <= 0.8))
    if "c" in scenarios:
        checks.append(("(c) CPU per resumed handshake ≤ 0.7 × best peer", per_round(res, "c", "cpu_per_10k", "best-low"), lambda v: v <= 0.7))
        checks.append(("(c) requests/s ≥ best peer", per_round(res, "c", "rps", "best-high"), lambda v: v >= 1.0))
    if "f" in scenarios:
        checks.append(("(f) CPU per full handshake ≤ 0.7 × best peer", per_round(res, "f", "cpu_per_10k", "best-low"), lambda v: v <= 0.7))
        floor = floor_us(report["crypto"])
        mine = med(by(res, "f", "linkgate", "cpu_per_10k")) * 100
        checks.append(("(f) CPU per full handshake ≤ 1.5 × crypto floor (stretch)", mine / floor, lambda v: v <= 1.5))
    for s in [x for x in THROUGHPUT if x in scenarios]:
        checks.append((f"({s}) p99 ≤ best peer", per_round(res, s, "p99_ms", "best-low"), lambda v: v <= 1.0))
    if "d" in scenarios:
        checks.append(("(d) memory per idle connection ≤ 0.5 × nginx", per_round(res, "d", "rss_per_conn", "nginx"), lambda v: v <= 0.5))
    lines += ["| target | ratio | met |", "|---|---:|---|"]
    for label, v, ok in checks:
        met = "n/a" if math.isnan(v) else ("yes" if ok(v) else "**no**")
        lines.append(f"| {label} | {fmt(v, '.2f')} | {met} |")
    missed = [label for label, v, ok in checks if not math.isnan(v) and not ok(v)]
    lines += explain(res, report.get("profiles", {}), missed, scenarios, contenders)
    md_path.write_text("\n".join(lines))
    svg_path.write_text(svg(chart))


KERNEL = "kernel"
TCP = "kernel: TCP/IP over loopback (both ends)"
UDP = "kernel: UDP (QUIC's datagrams, both ends)"
SCHED = "kernel: scheduler, wake-ups, interrupts"


def explain(res, profiles, missed, scenarios, contenders):
    """The sections that say why: user and kernel CPU of every contender, the
    profile of linkgate, and for each missed target the figures behind it."""
    lines = ["", "## Where the CPU goes", "",
             "CPU seconds per 10,000 requests split into user space and kernel (utime and stime from `/proc`, "
             "medians over rounds). The kernel part is mostly TCP over loopback (UDP in (i)), paid for both ends of each "
             "connection the proxy holds, and is the same work for every contender.", "",
             "| scenario | " + " | ".join(f"{c} user + kernel" for c in contenders) + " |",
             "|---|" + "---:|" * len(contenders)]
    for s in [x for x in THROUGHPUT if x in scenarios]:
        lines.append(f"| ({s}) | " + " | ".join(
            f"{fmt(med(by(res, s, c, 'user_per_10k')), '.3f')} + {fmt(med(by(res, s, c, 'kernel_per_10k')), '.3f')}"
            for c in contenders) + " |")
    if profiles:
        done = {s: p for s, p in profiles.items() if p.get("groups")}
        lines += ["", "### Profile of linkgate", "",
                  "One extra run per scenario under `perf record -e cpu-clock` (999 Hz) on linkgate's process; "
                  "self time grouped by the crate or kind of function it is spent in, as a share of all samples.", ""]
        failed = [f"- ({s}): no profile — {p['error']}" for s, p in profiles.items() if p.get("error")]
        if failed:
            lines += failed + [""]
        if done:
            order = sorted({g for p in done.values() for g in p["groups"]},
                           key=lambda g: (not g.startswith(KERNEL), -max(p["groups"].get(g, 0) for p in done.values())))
            lines += ["| spent in | " + " | ".join(f"({s})" for s in done) + " |", "|---|" + "---:|" * len(done)]
            for g in order:
                lines.append(f"| {g} | " + " | ".join(f"{p['groups'].get(g, 0):.1f}%" for p in done.values()) + " |")
            lines.append("| **kernel, all** | " + " | ".join(
                f"**{kernel_share(p):.1f}%**" for p in done.values()) + " |")
            for s, p in done.items():
                lines += ["", f"Largest user-space functions in ({s}), self time:", ""]
                lines += [f"- {pct:.2f}% `{sym}` ({group})" for pct, sym, group in p["top"][:8]]
    lines += ["", "## Why targets are missed", ""]
    if not missed:
        lines += ["Every target is met.", ""]
        return lines
    for s in ["a", "b", "c", "e", "f", "i"]:
        mine = [m for m in missed if m.startswith(f"({s})")]
        if not mine:
            continue
        peer = best_cpu_peer(res, s, contenders)
        u, k = med(by(res, s, "linkgate", "user_per_10k")), med(by(res, s, "linkgate", "kernel_per_10k"))
        text = f"- **{', '.join(mine)}.**"
        if peer:
            pu, pk = med(by(res, s, peer, "user_per_10k")), med(by(res, s, peer, "kernel_per_10k"))
            text += (f" Against {peer}, the peer with the least CPU per request here: linkgate's kernel CPU is "
                     f"{fmt(k, '.3f')} s per 10k requests against {fmt(pk, '.3f')} ({fmt(k / pk if pk else math.nan, '.2f')}×), "
                     f"its user-space CPU {fmt(u, '.3f')} against {fmt(pu, '.3f')} ({fmt(u / pu if pu else math.nan, '.2f')}×).")
        p = profiles.get(s, {})
        if p.get("groups"):
            user = sorted(((g, v) for g, v in p["groups"].items() if not g.startswith(KERNEL)), key=lambda kv: -kv[1])
            text += (f" In linkgate's profile {kernel_share(p):.0f}% of the samples are in the kernel "
                     f"({p['groups'].get(TCP, 0):.0f}% TCP/IP, "
                     + (f"{p['groups'][UDP]:.0f}% UDP, " if p["groups"].get(UDP) else "")
                     + f"{p['groups'].get(SCHED, 0):.0f}% scheduler, wake-ups and "
                     f"interrupts); user space is spread over " + ", ".join(f"{g} {v:.1f}%" for g, v in user[:5])
                     + f", the largest single function {p['top'][0][0]:.1f}% (`{p['top'][0][1][:60]}`).")
        lines.append(text)
    if any(m.startswith("(d)") for m in missed):
        lines.append("- **(d) memory per idle connection.** Not profiled by this script: the heap of a parked TLS "
                     "connection, measured with heaptrack, is broken down in `bench/README.md` (Findings).")
    lines += ["", "The analysis of these figures, and what was tried, is in `bench/README.md` (Findings).", ""]
    return lines


def kernel_share(profile):
    return sum(v for g, v in profile["groups"].items() if g.startswith(KERNEL))


def best_cpu_peer(res, scenario, contenders):
    peers = [(med(by(res, scenario, c, "cpu_per_10k")), c) for c in contenders if c != "linkgate"]
    peers = [(v, c) for v, c in peers if not math.isnan(v)]
    return min(peers)[1] if peers else None


def svg(rows):
    """Horizontal bars of ratios, one group per figure, with a line at 1.0."""
    colors = {"nginx": "#2f9e44", "haproxy": "#1971c2", "caddy": "#e8590c"}
    bar, gap, left, width = 12, 14, 250, 420
    finite = [v for _, vals, _ in rows for v in vals if not math.isnan(v)]
    top = max([2.0, *finite]) * 1.05
    height = 40 + len(rows) * (3 * bar + gap) + 30
    x = lambda v: left + width * min(v, top) / top  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 80}" height="{height}" font-family="sans-serif" font-size="11">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="10" y="18" font-size="13" font-weight="bold">linkgate ÷ peer (median of rounds). requests/s: right is better; CPU and memory: left is better</text>']
    y = 36
    for label, vals, _higher in rows:
        out.append(f'<text x="10" y="{y + 1.5 * bar + 4}">{escape(label)}</text>')
        for peer, v in zip(PEERS, vals):
            if not math.isnan(v):
                out.append(f'<rect x="{left}" y="{y}" width="{x(v) - left:.1f}" height="{bar - 2}" fill="{colors[peer]}"/>')
                out.append(f'<text x="{x(v) + 4:.1f}" y="{y + bar - 3}">{peer} {v:.2f}</text>')
            y += bar
        y += gap
    out.append(f'<line x1="{x(1.0):.1f}" y1="30" x2="{x(1.0):.1f}" y2="{y}" stroke="black" stroke-dasharray="4 3"/>')
    out.append(f'<text x="{x(1.0) - 8:.1f}" y="{y + 14}">1.0</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
