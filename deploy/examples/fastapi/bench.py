#!/usr/bin/env python3
"""The FastAPI example before and after gatehouse, measured side by side.

Run through bench.sh (it sets up the venv, wrk, h2load and the release build first):

    bash deploy/examples/fastapi/bench.sh                        # before vs after, ~2.5 min
    bash deploy/examples/fastapi/bench.sh --targets after,after-unix   # TCP vs Unix-socket hop

Targets, each a "pod" pinned to --pod-cpu (the load generators run on --load-cpu):
  before      before/app.py under uvicorn: the middleware in Python
  after       app.py under uvicorn on 127.0.0.1, gatehouse in front with ./proxy.toml
  after-unix  the same, the app on a Unix socket (uvicorn --uds, APP_URL=unix:PATH)

Every target gets the same uvicorn command line (bar the address) and the same settings:
API_KEY, RATE_LIMIT (1000000/s: it never fires, but every request pays for it) and an
AUDIT_FILE. Before measuring, each must answer 200/401 with the same header names as the
others, pass its request id to the app, and write exactly one audit line per request.

Then, interleaved (A B, B A, A B ...): --rounds closed-loop windows (wrk), then --rounds
windows at one fixed offered rate below saturation (h2load --rps, latencies from its
per-request log).
In every window the CPU time (utime+stime from /proc/PID/stat) of every process of the
target is read, so CPU µs per request is the whole pod's. Figures are medians over rounds;
ratios are medians of the per-round ratios to the first target (paired, so drift cancels).
Stdlib only.
"""

import argparse
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
API_KEY = "bench-fastapi-3c9e71d2"
# proxy.toml's maximum: with its burst of 5 a key may send 5 requests within 5 µs, which a
# request that takes tens of µs to serve never does. A 429 would fail the window it is in.
RATE_LIMIT = "1000000/s"
PATH = "/items/42"
TARGETS = ("before", "after", "after-unix")
# Headers each feature adds: a target that lacks one is not doing the work being compared.
FEATURE_HEADERS_200 = {"x-request-id", "x-response-time", "server-timing", "ratelimit-limit",
                       "ratelimit-remaining", "ratelimit-reset"}
FEATURE_HEADERS_401 = {"x-request-id", "x-response-time", "server-timing", "www-authenticate"}
CLK_TCK = os.sysconf("SC_CLK_TCK")
STARTED = []  # every Popen we started (own process group each), stopped on exit

# wrk prints one machine-readable line; only a done() hook, so no per-request Lua cost.
WRK_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"duration_us":%d,"requests":%d,"non2xx":%d,"socket_errors":%d,' ..
    '"p50_us":%.0f,"p99_us":%.0f}\n',
    summary.duration, summary.requests, e.status,
    e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


class BenchError(Exception):
    pass


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- /proc

def cpu_ticks(pid):
    """utime+stime (+ waited-for children) of a process, all its threads; 0 once gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return sum(int(x) for x in fields[11:15])  # fields 14-17: utime stime cutime cstime


def core_ticks(cpu):
    """(busy, total) ticks of one CPU from /proc/stat."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) for x in line.split()[1:9]]
                busy = v[0] + v[1] + v[2] + v[5] + v[6]  # user nice system irq softirq
                return busy, busy + v[3] + v[4] + v[7]  # + idle iowait steal
    raise BenchError(f"no cpu{cpu} in /proc/stat")


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def cpu_model():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


# ----------------------------------------------------------------------------- processes

def start(name, argv, cpu, workdir, env, cwd):
    out = open(os.path.join(workdir, f"{name}.log"), "ab")
    p = subprocess.Popen(["taskset", "-c", str(cpu)] + argv, stdin=subprocess.DEVNULL, stdout=out,
                         stderr=subprocess.STDOUT, env=dict(os.environ, **env), cwd=cwd,
                         start_new_session=True)
    out.close()
    p.name = name
    p.log_path = os.path.join(workdir, f"{name}.log")
    STARTED.append(p)
    return p


def stop(p, timeout=15.0):
    """SIGTERM p's own process group and wait (gatehouse flushes its audit queue then)."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)
    if p in STARTED:
        STARTED.remove(p)


def tail(path, n=20):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def wait_until(p, connect, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        if p.poll() is not None:
            raise BenchError(f"{p.name} exited with {p.returncode} before {what}:\n{tail(p.log_path)}")
        try:
            connect().close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise BenchError(f"{p.name}: no {what} within {timeout:.0f}s:\n{tail(p.log_path)}")
            time.sleep(0.05)


def port_free(port):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is no owner
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


# ----------------------------------------------------------------------------- targets

class Target:
    """One pod: its processes (app, and gatehouse for the after targets), its port, its audit file."""

    def __init__(self, name, port):
        self.name = name
        self.port = port
        self.procs = {}  # role ("app", "proxy") -> Popen
        self.audit_file = None
        self.closed = []  # per-round results
        self.open = []


def connector(where):
    """Connects to `where`: a port on 127.0.0.1, or a Unix socket's path."""
    def connect():
        if isinstance(where, int):
            return socket.create_connection(("127.0.0.1", where))
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(where)
        except OSError:
            s.close()
            raise
        return s
    return connect


def start_target(name, index, args, workdir):
    """Starts a target's app (and gatehouse in front of it) on the pod's CPU."""
    base = args.port_base + 10 * index
    t = Target(name, base)
    t.audit_file = os.path.join(workdir, f"{name}.audit.jsonl")
    settings = {"API_KEY": API_KEY, "RATE_LIMIT": RATE_LIMIT, "AUDIT_FILE": t.audit_file,
                "PYTHONDONTWRITEBYTECODE": "1"}
    # The same uvicorn command line for every target, but for the app and its address.
    app_dir, listen = {"before": ("before", base), "after": (".", base + 1),
                       "after-unix": (".", os.path.join(workdir, "app.sock"))}[name]
    address = ["--uds", listen] if isinstance(listen, str) else ["--host", "127.0.0.1", "--port", str(listen)]
    argv = [os.path.join(args.venv, "bin", "python"), "-m", "uvicorn", "app:app", "--app-dir", app_dir]
    t.procs["app"] = start(f"{name}-app", argv + address, args.pod_cpu, workdir, settings, HERE)
    wait_until(t.procs["app"], connector(listen), "listening")
    if name == "before":
        return t
    env = dict(settings, GATEHOUSE_LISTEN=f"127.0.0.1:{base}", ADMIN_LISTEN=f"127.0.0.1:{base + 2}",
               APP_URL=f"unix:{listen}" if isinstance(listen, str) else f"http://127.0.0.1:{listen}")
    config = os.path.join(HERE, "proxy.toml")
    check = subprocess.run([args.binary, "check", "--config", config], capture_output=True, text=True,
                           env=dict(os.environ, **env))
    if check.returncode != 0:
        raise BenchError(f"gatehouse check {config} failed:\n{check.stdout}{check.stderr}")
    t.procs["proxy"] = start(f"{name}-gatehouse", [args.binary, "run", "--config", config], args.pod_cpu,
                             workdir, env, workdir)
    wait_until(t.procs["proxy"], connector(base), "listening")
    return t


def get(port, path, headers):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request("GET", path, headers=headers)
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def audit_lines(t):
    try:
        with open(t.audit_file, "rb") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def audit_counts(t):
    """(audit events of 200s, 200s in uvicorn's access log) once the audit file is complete.
    Both count requests that wrk's connections left unanswered at the end of its windows,
    which wrk does not; only one of them may count such a request."""
    # A Python writer task drains its queue while the app runs; gatehouse flushes on SIGTERM.
    if "proxy" in t.procs:
        stop(t.procs["proxy"])
    lines, deadline = -1, time.monotonic() + 15
    while time.monotonic() < deadline and lines != len(audit_lines(t)):
        lines = len(audit_lines(t))
        time.sleep(1)
    events = sum(1 for line in audit_lines(t) if json.loads(line).get("status") == 200)
    with open(t.procs["app"].log_path, errors="replace") as f:
        served = len(re.findall(r'"GET [^"]*" 200\b', f.read()))
    return events, served


def check(targets):
    """Before measuring: each target does every feature, with the same header names as the
    others, and writes one audit line per request. Returns the problems found."""
    problems, seen = [], {}
    for t in targets:
        status, ok_h, body = get(t.port, PATH, {"x-api-key": API_KEY})
        denied = [get(t.port, PATH, h) for h in ({}, {"x-api-key": API_KEY + "-wrong"})]
        if status != 200:
            problems.append(f"{t.name}: GET {PATH} with the key -> {status}, want 200: {body[:200]!r}")
            continue
        rid = ok_h.get("x-request-id")
        if json.loads(body).get("request_id") != rid:
            problems.append(f"{t.name}: the app did not get the request id {rid!r}: {body[:200]!r}")
        for st, h, b in denied:
            if st != 401:
                problems.append(f"{t.name}: GET {PATH} without a valid key -> {st}, want 401")
            for name in sorted(FEATURE_HEADERS_401 - h.keys()):
                problems.append(f"{t.name}: the 401 has no {name}")
        for name in sorted(FEATURE_HEADERS_200 - ok_h.keys()):
            problems.append(f"{t.name}: the 200 has no {name}")
        # gatehouse answers a 401 itself, so it lacks the app server's `server` header.
        seen[t.name] = (set(ok_h), set(denied[0][1]) - {"server"}, rid)
    ref = targets[0].name
    for name, (ok_names, denied_names, _) in seen.items():
        if name == ref or ref not in seen:
            continue
        for what, mine, theirs in (("200", ok_names, seen[ref][0]), ("401", denied_names, seen[ref][1])):
            if mine != theirs:
                problems.append(f"{name}'s {what} headers differ from {ref}'s: only {name}: "
                                f"{sorted(mine - theirs)}, only {ref}: {sorted(theirs - mine)}")
    # gatehouse writes its audit file in batches, at least every flush_interval (1s).
    deadline = time.monotonic() + 5
    for t in targets:
        while len(audit_lines(t)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        lines = audit_lines(t)
        if len(lines) != 3:
            problems.append(f"{t.name}: {len(lines)} audit lines for 3 requests, want one each")
            continue
        try:
            events = [json.loads(line) for line in lines]
        except ValueError as e:
            problems.append(f"{t.name}: an audit line is not JSON ({e}): {lines}")
            continue
        if sorted(e.get("status") for e in events) != [200, 401, 401]:
            problems.append(f"{t.name}: audit statuses {[e.get('status') for e in events]}, want 200, 401, 401")
        if t.name in seen and seen[t.name][2] not in [e.get("request_id") for e in events]:
            problems.append(f"{t.name}: no audit line carries the 200's request id {seen[t.name][2]}")
    return problems


# ----------------------------------------------------------------------------- load

def run_loadgen(argv, seconds):
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=seconds + 60)
    return p.returncode, p.stdout, p.stderr


def wrk(t, seconds, args, workdir):
    lua = os.path.join(workdir, "report.lua")
    argv = ["taskset", "-c", str(args.load_cpu), args.wrk, "-t1", f"-c{args.connections}",
            f"-d{seconds}s", "--timeout", "10s", "-s", lua, "-H", f"x-api-key: {API_KEY}",
            f"http://127.0.0.1:{t.port}{PATH}"]
    rc, out, err = run_loadgen(argv, seconds)
    m = re.search(r"^BENCHJSON (\{.*\})$", out, re.M)
    if rc != 0 or not m:
        raise BenchError(f"wrk against {t.name} failed (exit {rc}):\n{out}{err}")
    r = json.loads(m.group(1))
    return {"requests": r["requests"], "seconds": r["duration_us"] / 1e6, "errors": r["non2xx"] + r["socket_errors"],
            "p50_ms": r["p50_us"] / 1000, "p99_ms": r["p99_us"] / 1000}


def h2load(t, seconds, args, workdir, tag):
    """A fixed offered rate, evenly spread. Each h2load connection sends --rps requests a
    second on its own timer, started when it connects: with -D all connect at once and their
    requests arrive in bursts of --connections. Connecting them one by one (-r, --rate-period
    in whole ms; -n instead of -D, which -r excludes) spreads the timers over one interval."""
    log_file = os.path.join(workdir, f"{tag}.requests.tsv")
    gap_ms = 1000 / args.rate  # between two requests, and so between two connections' starts
    per_period, period_ms = (1, round(gap_ms)) if gap_ms >= 1 else (round(args.rate / 1000), 1)
    argv = ["taskset", "-c", str(args.load_cpu), args.h2load, "--h1", "-t1", "-c", str(args.connections),
            f"--rps={args.rate / args.connections:.3f}", "-n", str(round(args.rate * seconds)),
            "-r", str(per_period), f"--rate-period={period_ms}ms", "-H", f"x-api-key: {API_KEY}",
            f"--log-file={log_file}", f"http://127.0.0.1:{t.port}{PATH}"]
    rc, out, err = run_loadgen(argv, seconds)
    fin = re.search(r"finished in ([\d.]+)(m?s)", out)
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                     r"(\d+) errored, (\d+) timeout", out)
    if rc != 0 or not (fin and done):
        raise BenchError(f"h2load against {t.name} failed (exit {rc}):\n{out}{err}")
    with open(log_file) as f:  # one row per request: start (µs), status, latency (µs)
        lat = sorted(int(row.split("\t")[2]) for row in f if row.count("\t") >= 2)
    os.remove(log_file)
    if not lat:
        raise BenchError(f"h2load against {t.name}: empty per-request log")

    def pct(q):
        return lat[min(len(lat) - 1, int(len(lat) * q / 100))] / 1000

    requests, succeeded = int(done.group(1)), int(done.group(2))
    seconds_run = float(fin.group(1)) / (1000 if fin.group(2) == "ms" else 1)
    # failed (errored included) and non-2xx are done but not succeeded
    return {"requests": requests, "seconds": seconds_run, "errors": requests - succeeded + int(done.group(5)),
            "p50_ms": pct(50), "p99_ms": pct(99), "max_ms": lat[-1] / 1000}


def measure(t, load, args):
    """One window: the load generator's figures plus the CPU time of each of t's processes."""
    before = {role: cpu_ticks(p.pid) for role, p in t.procs.items()}
    core0 = core_ticks(args.pod_cpu)
    t0 = time.monotonic()
    r = load()
    wall = time.monotonic() - t0
    core1 = core_ticks(args.pod_cpu)
    used = {role: (cpu_ticks(p.pid) - before[role]) / CLK_TCK for role, p in t.procs.items()}
    for p in t.procs.values():
        if p.poll() is not None:
            raise BenchError(f"{p.name} exited with {p.returncode} during a window:\n{tail(p.log_path)}")
    if r["errors"]:
        raise BenchError(f"{t.name}: {r['errors']} requests failed, timed out or were not 2xx in a window")
    n = r["requests"] or 1
    r["rps"] = r["requests"] / r["seconds"]
    for role, secs in used.items():
        r[f"{role}_us"] = secs * 1e6 / n
    r["pod_us"] = sum(used.values()) * 1e6 / n
    r["pod_pct"] = 100 * sum(used.values()) / wall
    busy, total = core1[0] - core0[0], core1[1] - core0[1]
    # What else ran on the pod's core: the idle targets, other tenants, the kernel.
    r["other_pct"] = max(0.0, 100 * busy / total - r["pod_pct"]) if total else None
    return r


def run_rounds(targets, phase, load, args):
    """--rounds windows per target, interleaved and in alternating order (A B, B A, ...), so
    that the machine drifting within a round favours neither."""
    for rnd in range(1, args.rounds + 1):
        for t in targets if rnd % 2 else targets[::-1]:
            r = measure(t, lambda: load(t, f"{t.name}-{phase}-r{rnd}"), args)
            getattr(t, phase).append(r)
            log(f"  {phase:6s} r{rnd} {t.name:10s} {r['rps']:7,.0f} req/s  {split_us(r)}  p50 {r['p50_ms']:.2f} "
                f"p99 {r['p99_ms']:.2f} ms  other {fmt(r['other_pct'], 0)}%")


# ----------------------------------------------------------------------------- summary

def split_us(r):
    """One window's CPU µs/request: the pod's, and the app's and gatehouse's shares."""
    proxy = f" + gatehouse {r['proxy_us']:,.0f}" if "proxy_us" in r else ""
    return f"pod {r['pod_us']:6,.0f} µs/req (app {r['app_us']:,.0f}{proxy})"


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def paired_ratio(rounds, ref_rounds, key):
    return med([a[key] / b[key] for a, b in zip(rounds, ref_rounds) if a.get(key) and b.get(key)])


def fmt(v, digits=0):
    return "—" if v is None else f"{v:,.{digits}f}"


def cell(rounds, key, digits=0):
    values = [r[key] for r in rounds if r.get(key) is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return fmt(values[0], digits)
    return f"{fmt(med(values), digits)} ({fmt(min(values), digits)}–{fmt(max(values), digits)})"


def table(targets, args, audit):
    ref = targets[0]
    others = targets[1:]
    head = ["", *(t.name for t in targets), *(f"{t.name} ÷ {ref.name}" for t in others)]
    rows = []

    def row(label, phase, key, digits=0):
        ratios = [paired_ratio(getattr(t, phase), getattr(ref, phase), key) for t in others]
        rows.append([label, *(cell(getattr(t, phase), key, digits) for t in targets),
                     *("" if r is None else f"{r:.2f}×" for r in ratios)])

    def plain(label, values, digits):
        rows.append([label, *(fmt(v, digits) for v in values), *("" for _ in others)])

    rate = f"{args.rate:,.0f} req/s"
    for phase, load in (("closed", "closed loop"), ("open", f"at {rate}")):
        if phase == "closed":
            row("req/s, closed loop (wrk)", phase, "rps")
        else:
            row(f"p50 ms at {rate} (open loop, h2load)", phase, "p50_ms", 2)
            row(f"p99 ms at {rate}", phase, "p99_ms", 2)
        row(f"CPU µs/request, whole pod, {load}", phase, "pod_us")
        row("… the app (uvicorn)", phase, "app_us")
        row("… gatehouse", phase, "proxy_us")
    plain("audit events per request served", [audit[t.name][0] / audit[t.name][1] if audit[t.name][1] else None
                                               for t in targets], 3)
    plain("other work on the pod's CPU, % (median)",
          [med([r.get("other_pct") for r in t.closed + t.open]) for t in targets], 1)
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def notes(targets, args, audit):
    out = []
    for t in targets:
        events, served = audit[t.name]
        cut_off = args.connections * (args.rounds + (1 if args.warmup else 0))
        if abs(events - served) > cut_off:
            out.append(f"{t.name}: {events:,} audit events for {served:,} requests served, more apart than the "
                       f"{cut_off} requests wrk may cut off: events were lost or written twice")
        held = med([r["rps"] for r in t.open])
        if held is not None and held < 0.97 * args.rate:
            out.append(f"{t.name} held only {held:,.0f} of the {args.rate:,.0f} req/s offered: it was saturated, "
                       f"so its open-loop figures are not at equal load (lower --rate)")
        for phase in ("closed", "open"):
            values = [r["pod_us"] for r in getattr(t, phase)]
            if len(values) > 1 and max(values) > 1.15 * min(values):
                out.append(f"{t.name}: CPU µs/request varied {min(values):,.0f}–{max(values):,.0f} over the "
                           f"{phase}-loop rounds (>15%): a noisy machine; add --rounds")
        busy = [r for r in t.closed + t.open if (r.get("other_pct") or 0) > 10]
        if busy:
            out.append(f"{t.name}: in {len(busy)} of {len(t.closed + t.open)} windows other processes used over "
                       f"10% of the pod's CPU (up to {max(r['other_pct'] for r in busy):.0f}%)")
    return out


# ----------------------------------------------------------------------------- main

def parse_args(argv):
    ap = argparse.ArgumentParser(prog="bench.sh", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="before,after",
                    help="comma list of before, after, after-unix; ratios are to the first (default before,after)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per load (default 3)")
    ap.add_argument("--duration", type=int, default=10, help="seconds per window (default 10)")
    ap.add_argument("--warmup", type=int, default=3, help="closed-loop seconds per target before measuring (default 3)")
    ap.add_argument("--rate", type=float, default=0,
                    help="open-loop offered req/s (default: half the slowest target's closed-loop req/s)")
    ap.add_argument("--connections", type=int, default=16, help="wrk and h2load connections (default 16)")
    ap.add_argument("--pod-cpu", type=int, default=1, help="CPU for the apps and gatehouse (default 1)")
    ap.add_argument("--load-cpu", type=int, default=0, help="CPU for wrk, h2load and this script (default 0)")
    ap.add_argument("--port-base", type=int, default=20300,
                    help="targets use base, base+10, base+20 (+1 app, +2 admin) (default 20300)")
    ap.add_argument("--binary", required=True,
                    help="gatehouse binary (bench.sh builds and passes target/release/gatehouse)")
    ap.add_argument("--venv", required=True, help="venv with requirements.txt (bench.sh sets it up)")
    ap.add_argument("--keep-workdir", action="store_true", help="keep logs and audit files")
    ap.add_argument("--wrk", default="wrk", help="wrk executable (default: wrk on PATH)")
    ap.add_argument("--h2load", default="h2load", help="h2load executable (default: h2load on PATH)")
    args = ap.parse_args(argv)
    names = [n for n in args.targets.split(",") if n]
    bad = [n for n in names if n not in TARGETS]
    if bad or not names or len(set(names)) != len(names):
        ap.error(f"--targets: a comma list of distinct {', '.join(TARGETS)}, got {args.targets!r}")
    if args.rounds < 1 or args.duration < 1 or args.warmup < 0 or args.rate < 0 or args.connections < 1:
        ap.error("--rounds, --duration and --connections must be at least 1, --warmup and --rate not negative")
    usable = os.sched_getaffinity(0)
    if args.pod_cpu == args.load_cpu or not {args.pod_cpu, args.load_cpu} <= usable:
        ap.error(f"--pod-cpu and --load-cpu must be two distinct CPUs of {sorted(usable)}")
    args.names = names
    args.binary = os.path.abspath(args.binary)  # gatehouse runs in the work dir
    return args


def main(argv):
    args = parse_args(argv)
    for tool in (args.wrk, args.h2load, "taskset"):
        if not shutil.which(tool):
            log(f"bench: {tool} not found (bench.sh installs wrk, nghttp2-client and util-linux)")
            return 2
    busy = [args.port_base + 10 * i + k for i in range(len(args.names)) for k in range(3)
            if not port_free(args.port_base + 10 * i + k)]
    if busy:
        log(f"bench: 127.0.0.1 ports {busy} are in use: pick another --port-base")
        return 2
    started = time.monotonic()
    load_start = loadavg()
    os.sched_setaffinity(0, {args.load_cpu})  # this script stays off the pod's CPU
    workdir = tempfile.mkdtemp(prefix="fastapi-bench.")
    with open(os.path.join(workdir, "report.lua"), "w") as f:
        f.write(WRK_LUA)
    log(f"bench: work dir {workdir}; load average {load_start}")
    targets = []
    try:
        for i, name in enumerate(args.names):
            log(f"bench: start {name} (CPU {args.pod_cpu})")
            targets.append(start_target(name, i, args, workdir))
        problems = check(targets)
        if problems:
            raise BenchError("check before measuring failed:\n- " + "\n- ".join(problems))
        log("bench: checked: same header names, request id reaches the app, one audit line per request")
        for t in targets:
            if args.warmup:
                wrk(t, args.warmup, args, workdir)
        run_rounds(targets, "closed", lambda t, tag: wrk(t, args.duration, args, workdir), args)
        if not args.rate:
            slowest = min(med([r["rps"] for r in t.closed]) for t in targets)
            args.rate = max(10, int(slowest / 2 / 10) * 10)
        log(f"bench: open loop at {args.rate:,.0f} req/s")
        run_rounds(targets, "open", lambda t, tag: h2load(t, args.duration, args, workdir, tag), args)
        audit = {t.name: audit_counts(t) for t in targets}
    except (BenchError, OSError, http.client.HTTPException, subprocess.TimeoutExpired) as e:
        log(f"bench: FAILED: {e!r}" if not isinstance(e, BenchError) else f"bench: FAILED: {e}")
        return 1
    finally:
        for p in list(STARTED):
            stop(p)
        if args.keep_workdir:
            log(f"bench: kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    python = subprocess.run([os.path.join(args.venv, "bin", "python"), "-c",
                             "import importlib.metadata as m, os, sys; print(sys.version.split()[0], "
                             "os.path.realpath(sys.executable), m.version('fastapi'), m.version('uvicorn'))"],
                            capture_output=True, text=True).stdout.split()
    print(f"FastAPI example, {' vs '.join(args.names)}: Python {python[0]} ({python[1]}), fastapi {python[2]}, "
          f"uvicorn {python[3]} (one worker, same options), gatehouse `{args.binary}`; the pod on CPU "
          f"{args.pod_cpu}, wrk/h2load on CPU {args.load_cpu}, {args.connections} connections; {args.rounds} "
          f"interleaved rounds of {args.duration} s per load; medians (min–max); ratios are medians of per-round "
          f"ratios.\n")
    print(table(targets, args, audit))
    for n in notes(targets, args, audit):
        print(f"- {n}")
    print(f"\nMachine: {os.cpu_count()} CPUs, {cpu_model()}, Linux {platform.release()}; load average "
          f"{load_start} at start, {loadavg()} at end; {time.monotonic() - started:.0f} s.")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
