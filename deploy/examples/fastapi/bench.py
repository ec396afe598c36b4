#!/usr/bin/env python3
"""The FastAPI example before and after gatehouse, and gatehouse's seat beside it against nginx's.

Run through bench.sh (it sets up the venv, wrk, h2load, nginx and the release build first):

    bash deploy/examples/fastapi/bench.sh                        # before vs after, ~2.5 min
    bash deploy/examples/fastapi/bench.sh --targets after,after-unix   # TCP vs Unix-socket hop
    bash deploy/examples/fastapi/bench.sh --seat                 # the proxy's seat: nginx vs gatehouse
    bash deploy/examples/fastapi/bench.sh --gzip                 # gzip in Python vs in gatehouse

Targets, each a "pod" pinned to --pod-cpu (the load generators run on --load-cpu):
  before      before/app.py under uvicorn: the middleware in Python
  after       app.py under uvicorn on 127.0.0.1, gatehouse in front with ./proxy.toml
  after-unix  the same, the app on a Unix socket (uvicorn --uds, APP_URL=unix:PATH)
  basic       app.py, gatehouse with one `headers` middleware (one response header) in front
  basic-unix  the same, the app on a Unix socket
  nginx       app.py, nginx in gatehouse's seat: proxy_pass to an upstream keep-alive pool, one
              worker, access_log off, one response header (the `basic` pair's config, shared
              with benches/compare)
  nginx-unix  the same, the app on a Unix socket
  gzip-before before/gzip_app.py: app.py with Starlette's GZipMiddleware (gzip at --gzip-level)
  gzip-after  app.py, gatehouse with `compress` (gzip only, the same level) in front: the
              config benches/compare uses for its gzip scenarios
The gzip-* targets are loaded with GET /catalog (~20 KiB of JSON) and Accept-Encoding: gzip,
the others with GET /items/42 and the API key.
The compared pairs reach the app the same way: nginx, basic and after over TCP; the -unix
ones over a Unix socket. before and after* get the same settings: API_KEY, RATE_LIMIT
(1000000/s: it never fires, but every request pays for it) and an AUDIT_FILE. Before
measuring, those must answer 200/401 with the same header names as each other, pass their
request id to the app and write one audit line per request; basic and nginx must answer 200
with the app's body and their one header; gzip-* must answer gzip that decodes to the same
JSON, with vary: accept-encoding. Every target gets the same uvicorn command line
(bar the address).

Then, interleaved (A B, B A, A B ...): --rounds closed-loop windows (wrk), then --rounds
windows at one fixed offered rate below saturation (h2load, latencies from its per-request
log); --phases picks either. In every window each process of the target (the app, the proxy)
is measured on its own: CPU time from its CPU clock and its threads' schedstat (exact to the
ns, exited threads included, not clock ticks), context switches of every thread, and with
--syscalls its syscalls (perf or strace). Figures are medians over rounds; ratios are medians
of per-round ratios (paired, so drift cancels): the pod table's to the first target, the seat
table's to nginx over the same transport. Stdlib only.
"""

import argparse
import contextlib
import gzip
import http.client
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
COMPARE = os.path.join(HERE, "..", "..", "..", "benches", "compare")
sys.path.insert(0, COMPARE)
from benchlib import (STRACE_NOTE, SYSCALL_TOOLS, BenchError, Launcher, Window, cell, connector, core_times,  # noqa: E402
                      fmt, fmt_ratio, h2load, log, markdown, med, paired_ratio, port_free, render, tail, wait_until,
                      wrk)

API_KEY = "bench-fastapi-3c9e71d2"
# proxy.toml's maximum: with its burst of 5 a key may send 5 requests within 5 µs, which a
# request that takes tens of µs to serve never does. A 429 would fail the window it is in.
RATE_LIMIT = "1000000/s"
PATH = "/items/42"
GZIP_PATH = "/catalog"  # what the gzip-* targets are asked for
# gatehouse's compress levels by the zlib level they use (docs/middleware/compress.md)
COMPRESS_LEVELS = {1: "fastest", 6: "default", 9: "best"}
# name -> (the app's directory and module, how the proxy reaches it, the proxy in front: None,
# "chain" (gatehouse with ./proxy.toml), "basic" (gatehouse, one header), "nginx" or "compress"
# (gatehouse, gzip only))
TARGETS = {"before": ("before", "app", "tcp", None), "after": (".", "app", "tcp", "chain"),
           "after-unix": (".", "app", "unix", "chain"), "basic": (".", "app", "tcp", "basic"),
           "basic-unix": (".", "app", "unix", "basic"), "nginx": (".", "app", "tcp", "nginx"),
           "nginx-unix": (".", "app", "unix", "nginx"), "gzip-before": ("before", "gzip_app", "tcp", None),
           "gzip-after": (".", "app", "tcp", "compress")}
SEAT = "nginx,basic,after,nginx-unix,basic-unix,after-unix"
GZIP = "gzip-before,gzip-after"
SEAT_LABELS = {"nginx": "nginx, `proxy_pass` + one response header", "basic": "gatehouse, one response header",
               "chain": "gatehouse, the example's chain (`proxy.toml`)", "compress": "gatehouse, `compress` (gzip)"}
# Headers each feature adds: a target that lacks one is not doing the work being compared.
FEATURE_HEADERS_200 = {"x-request-id", "x-response-time", "server-timing", "ratelimit-limit",
                       "ratelimit-remaining", "ratelimit-reset"}
FEATURE_HEADERS_401 = {"x-request-id", "x-response-time", "server-timing", "www-authenticate"}
BASIC_HEADER = "x-bench-proxy"  # what the basic gatehouse and the nginx configs add


# ----------------------------------------------------------------------------- targets

class Target:
    """One pod: its processes (the app, and a proxy in front of it), its port, its audit file."""

    def __init__(self, name, port):
        self.name = name
        self.app_dir, self.module, self.transport, self.proxy = TARGETS[name]
        self.port = port
        self.procs = {}  # role ("app", "proxy") -> Popen
        self.audit_file = None
        self.closed = []  # per-round results
        self.open = []

    @property
    def gzip(self):
        """Does it compress /catalog (in Python or in gatehouse)?"""
        return self.name.startswith("gzip-")

    @property
    def chain(self):
        """Does it do the example's middleware (in Python or in gatehouse)?"""
        return self.proxy in (None, "chain") and not self.gzip


def start_target(name, index, args, workdir, launcher):
    """Starts a target's app (and the proxy in front of it) on the pod's CPU."""
    base = args.port_base + 10 * index
    t = Target(name, base)
    t.audit_file = os.path.join(workdir, f"{name}.audit.jsonl") if t.chain else None
    settings = {"API_KEY": API_KEY, "RATE_LIMIT": RATE_LIMIT, "AUDIT_FILE": t.audit_file or os.devnull,
                "GZIP_LEVEL": str(args.gzip_level), "PYTHONDONTWRITEBYTECODE": "1"}
    listen = (base if t.proxy is None else base + 1) if t.transport == "tcp" else os.path.join(workdir, f"{name}.sock")
    address = ["--uds", listen] if t.transport == "unix" else ["--host", "127.0.0.1", "--port", str(listen)]
    argv = [os.path.join(args.venv, "bin", "python"), "-m", "uvicorn", f"{t.module}:app", "--app-dir", t.app_dir]
    t.procs["app"] = launcher.start(f"{name}-app", argv + address, args.pod_cpu, settings, HERE)
    wait_until(t.procs["app"], connector(listen), "listening")
    if t.proxy is None:
        return t
    unix = t.transport == "unix"
    values = {"WORKDIR": workdir, "NAME": name, "LISTEN_PORT": base,
              "UPSTREAM_URL": f"unix:{listen}" if unix else f"http://127.0.0.1:{listen}",
              "UPSTREAM_SERVER": f"unix:{listen}" if unix else f"127.0.0.1:{listen}",
              "COMPRESS_LEVEL": COMPRESS_LEVELS[args.gzip_level]}
    if t.proxy == "nginx":
        conf = render(os.path.join(COMPARE, "configs", "basic-nginx.conf"), values,
                      os.path.join(workdir, f"{name}.nginx.conf"))
        argv = [args.nginx, "-p", workdir, "-c", conf, "-e", os.path.join(workdir, f"{name}.error.log")]
        t.procs["proxy"] = launcher.start(f"{name}-nginx", argv, args.pod_cpu)
    else:
        env = dict(settings, GATEHOUSE_LISTEN=f"127.0.0.1:{base}", ADMIN_LISTEN=f"127.0.0.1:{base + 2}",
                   APP_URL=values["UPSTREAM_URL"])
        config = (os.path.join(HERE, "proxy.toml") if t.proxy == "chain" else
                  render(os.path.join(COMPARE, "configs", f"{'gzip' if t.gzip else 'basic'}-gatehouse.toml"), values,
                         os.path.join(workdir, f"{name}.toml")))
        check = subprocess.run([args.binary, "check", "--config", config], capture_output=True, text=True,
                               env=dict(os.environ, **env))
        if check.returncode != 0:
            raise BenchError(f"gatehouse check {config} failed:\n{check.stdout}{check.stderr}")
        t.procs["proxy"] = launcher.start(f"{name}-gatehouse", [args.binary, "run", "--config", config],
                                          args.pod_cpu, env)
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


def audit_counts(t, launcher):
    """(audit events of 200s, 200s in uvicorn's access log) once the audit file is complete.
    Both count requests that wrk's connections left unanswered at the end of its windows,
    which wrk does not; only one of them may count such a request."""
    # A Python writer task drains its queue while the app runs; gatehouse flushes on SIGTERM.
    if "proxy" in t.procs:
        launcher.stop(t.procs["proxy"])
    lines, deadline = -1, time.monotonic() + 15
    while time.monotonic() < deadline and lines != len(audit_lines(t)):
        lines = len(audit_lines(t))
        time.sleep(1)
    events = sum(1 for line in audit_lines(t) if json.loads(line).get("status") == 200)
    with open(t.procs["app"].log_path, errors="replace") as f:
        served = len(re.findall(r'"GET [^"]*" 200\b', f.read()))
    return events, served


def check(targets):
    """Before measuring: each target with the example's chain does every feature, with the
    same header names as the others, and writes one audit line per request; each plain proxy
    answers 200 with the app's body and its one header. Returns the problems found."""
    problems, seen, catalogs = [], {}, {}
    for t in targets:
        if t.gzip:
            problems += check_gzip(t, catalogs)
            continue
        status, ok_h, body = get(t.port, PATH, {"x-api-key": API_KEY})
        if status != 200:
            problems.append(f"{t.name}: GET {PATH} with the key -> {status}, want 200: {body[:200]!r}")
            continue
        if not t.chain:
            if json.loads(body).get("id") != 42:
                problems.append(f"{t.name}: GET {PATH} did not reach the app: {body[:200]!r}")
            if BASIC_HEADER not in ok_h:
                problems.append(f"{t.name}: the 200 has no {BASIC_HEADER}")
            continue
        denied = [get(t.port, PATH, h) for h in ({}, {"x-api-key": API_KEY + "-wrong"})]
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
    ref = next(iter(seen), None)
    for name, (ok_names, denied_names, _) in seen.items():
        if name == ref:
            continue
        for what, mine, theirs in (("200", ok_names, seen[ref][0]), ("401", denied_names, seen[ref][1])):
            if mine != theirs:
                problems.append(f"{name}'s {what} headers differ from {ref}'s: only {name}: "
                                f"{sorted(mine - theirs)}, only {ref}: {sorted(theirs - mine)}")
    # gatehouse writes its audit file in batches, at least every flush_interval (1s).
    deadline = time.monotonic() + 5
    for t in (t for t in targets if t.name in seen):
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
        if seen[t.name][2] not in [e.get("request_id") for e in events]:
            problems.append(f"{t.name}: no audit line carries the 200's request id {seen[t.name][2]}")
    return problems


def check_gzip(t, catalogs):
    """A gzip-* target answers /catalog gzip-coded, decoding to JSON that every other gzip-*
    target's decodes to too (catalogs: name -> decoded body), with vary: accept-encoding; and
    without Accept-Encoding, uncompressed. Returns the problems found."""
    status, h, body = get(t.port, GZIP_PATH, {"accept-encoding": "gzip"})
    if status != 200:
        return [f"{t.name}: GET {GZIP_PATH} -> {status}, want 200: {body[:200]!r}"]
    if h.get("content-encoding") != "gzip" or "accept-encoding" not in h.get("vary", "").lower():
        return [f"{t.name}: GET {GZIP_PATH} with accept-encoding: gzip got content-encoding "
                f"{h.get('content-encoding')!r}, vary {h.get('vary')!r}; want gzip, accept-encoding"]
    try:
        decoded = gzip.decompress(body)
        json.loads(decoded)
    except (OSError, EOFError, ValueError) as e:
        return [f"{t.name}: GET {GZIP_PATH}'s body is not gzip-coded JSON: {e}"]
    problems = []
    plain = get(t.port, GZIP_PATH, {})
    if plain[0] != 200 or "content-encoding" in plain[1] or plain[2] != decoded:
        problems.append(f"{t.name}: GET {GZIP_PATH} without accept-encoding is not the same JSON uncompressed")
    for other, theirs in catalogs.items():
        if theirs != decoded:
            problems.append(f"{t.name}'s /catalog decodes to other JSON than {other}'s")
    catalogs[t.name] = decoded
    log(f"bench: {t.name}: /catalog {len(decoded):,} bytes of JSON, {len(body):,} gzip-coded")
    return problems


# ----------------------------------------------------------------------------- load

def load(t, phase, seconds, args, workdir, tag):
    url = f"http://127.0.0.1:{t.port}{GZIP_PATH if t.gzip else PATH}"
    headers = ["accept-encoding: gzip"] if t.gzip else [f"x-api-key: {API_KEY}"]
    if phase == "closed":
        return wrk(url, seconds, args.connections, args.load_cpu, headers, wrk_bin=args.wrk)
    return h2load(url, args.rate, seconds, args.connections, args.load_cpu,
                  os.path.join(workdir, f"{tag}.requests.tsv"), headers, args.h2load)


def measure(t, phase, args, workdir, tag):
    """One window: the load generator's figures plus, per process of t (the app, the proxy),
    its CPU time, context switches and (--syscalls, the proxy only) syscalls."""
    core0 = core_times()[args.pod_cpu]
    with contextlib.ExitStack() as stack:
        windows = {role: stack.enter_context(Window([p.pid], args.syscalls if role == "proxy" else None, workdir))
                   for role, p in t.procs.items()}
        t0 = time.monotonic()
        r = load(t, phase, args.duration, args, workdir, tag)
        wall = time.monotonic() - t0
    core1 = core_times()[args.pod_cpu]
    for p in t.procs.values():
        if p.poll() is not None:
            raise BenchError(f"{p.name} exited with {p.returncode} during a window:\n{tail(p.log_path)}")
    if r["non2xx"] or r["socket_errors"]:
        raise BenchError(f"{t.name}: {r['non2xx']} non-2xx answers and {r['socket_errors']} failed or timed-out "
                         f"requests in a window")
    n = r["requests"] or 1
    r["rps"] = r["requests"] / r["seconds"]
    for role, w in windows.items():
        r[f"{role}_us"] = w.cpu_s * 1e6 / n
        r[f"{role}_cs"] = w.switches / n
        r[f"{role}_churn"] = w.churn
        if w.syscalls is not None:
            r[f"{role}_syscalls"] = w.syscalls / n
    pod_s = sum(w.cpu_s for w in windows.values())
    r["pod_us"] = pod_s * 1e6 / n
    r["pod_cs"] = sum(w.switches for w in windows.values()) / n
    busy, _, total = (b - a for a, b in zip(core0, core1))
    # What else ran on the pod's core: the idle targets, other tenants, the kernel.
    r["other_pct"] = max(0.0, 100 * busy / total - 100 * pod_s / wall) if total else None
    return r


def run_rounds(targets, phase, args, workdir):
    """--rounds windows per target, interleaved and in alternating order (A B, B A, ...), so
    that the machine drifting within a round favours neither."""
    for rnd in range(1, args.rounds + 1):
        for t in targets if rnd % 2 else targets[::-1]:
            r = measure(t, phase, args, workdir, f"{t.name}-{phase}-r{rnd}")
            getattr(t, phase).append(r)
            log(f"  {phase:6s} r{rnd} {t.name:10s} {r['rps']:7,.0f} req/s  {split_us(r)}  p50 {r['p50_ms']:.2f} "
                f"p99 {r['p99_ms']:.2f} ms  other {fmt(r['other_pct'], 0)}%")


# ----------------------------------------------------------------------------- summary

def split_us(r):
    """One window's CPU µs/request: the pod's, and the app's and the proxy's shares."""
    proxy = ""
    if "proxy_us" in r:
        calls = f", {r['proxy_syscalls']:.1f} syscalls" if "proxy_syscalls" in r else ""
        proxy = f" + proxy {r['proxy_us']:,.0f} ({r['proxy_cs']:.2f} cs{calls})"
    return f"pod {r['pod_us']:6,.0f} µs/req (app {r['app_us']:,.0f}{proxy})"


def rate_label(args, phase):
    return "closed loop" if phase == "closed" else f"at {args.rate:,.0f} req/s"


def pod_table(targets, args, audit):
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

    for phase in args.phase_list:
        if phase == "closed":
            row("req/s, closed loop (wrk)", phase, "rps")
        else:
            row(f"p50 ms at {args.rate:,.0f} req/s (open loop, h2load)", phase, "p50_ms", 2)
            row(f"p99 ms at {args.rate:,.0f} req/s", phase, "p99_ms", 2)
        row(f"CPU µs/request, whole pod, {rate_label(args, phase)}", phase, "pod_us")
        row("… the app (uvicorn)", phase, "app_us")
        row("… the proxy", phase, "proxy_us")
        row(f"context switches/request, whole pod, {rate_label(args, phase)}", phase, "pod_cs", 2)
    if audit:
        plain("audit events per request served",
              [audit[t.name][0] / audit[t.name][1] if t.name in audit and audit[t.name][1] else None
               for t in targets], 3)
    plain("other work on the pod's CPU, % (median)",
          [med([r.get("other_pct") for r in t.closed + t.open]) for t in targets], 1)
    return markdown(head, rows)


def seat_table(targets, args, phase):
    """The proxy alone, per request, beside the app: the seat table."""
    nginx = {t.transport: t for t in targets if t.proxy == "nginx"}
    syscalls = any("proxy_syscalls" in r for t in targets for r in getattr(t, phase))
    head = ["proxy in the seat", "app over", "CPU µs/request", "÷ nginx (same transport)",
            "context switches/request", "syscalls/request", "app CPU µs/request"]
    rows = []
    for t in targets:
        if t.proxy is None or t.gzip:  # the gzip pair's proxy is in the pod table; no nginx to compare with
            continue
        rounds, ref = getattr(t, phase), nginx.get(t.transport)
        ratio = paired_ratio(rounds, getattr(ref, phase), "proxy_us") if ref else None
        rows.append([f"`{t.name}`: {SEAT_LABELS[t.proxy]}", "TCP" if t.transport == "tcp" else "Unix socket",
                     cell(rounds, "proxy_us"), fmt_ratio(ratio), cell(rounds, "proxy_cs", 2),
                     cell(rounds, "proxy_syscalls", 1) if syscalls else "not counted (--syscalls)",
                     cell(rounds, "app_us")])
    return markdown(head, rows) if rows else None


def notes(targets, args, audit):
    out = []
    for t in targets:
        if t.name in audit:
            events, served = audit[t.name]
            cut_off = args.connections * (args.rounds + (1 if args.warmup else 0))
            if abs(events - served) > cut_off:
                out.append(f"{t.name}: {events:,} audit events for {served:,} requests served, more apart than the "
                           f"{cut_off} requests wrk may cut off: events were lost or written twice")
        held = med([r["rps"] for r in t.open])
        if held is not None and held < 0.97 * args.rate:
            out.append(f"{t.name} held only {held:,.0f} of the {args.rate:,.0f} req/s offered: it was saturated, "
                       f"so its open-loop figures are not at equal load (lower --rate)")
        for phase in args.phase_list:
            for key, what in (("pod_us", "the pod's"), ("proxy_us", "the proxy's")):
                values = [r[key] for r in getattr(t, phase) if key in r]
                if len(values) > 1 and max(values) > 1.15 * min(values):
                    out.append(f"{t.name}: {what} CPU µs/request varied {min(values):,.0f}–{max(values):,.0f} over "
                               f"the {phase}-loop rounds (>15%): a noisy machine; add --rounds")
        churn = sorted({role for r in t.closed + t.open for role in t.procs if r.get(f"{role}_churn")})
        if churn:
            out.append(f"{t.name}: threads of its {' and '.join(churn)} exited during a window: their CPU is counted "
                       f"(the process clock keeps it), their context switches only in part (a lower bound)")
        busy = [r for r in t.closed + t.open if (r.get("other_pct") or 0) > 10]
        if busy:
            out.append(f"{t.name}: in {len(busy)} of {len(t.closed + t.open)} windows other processes used over "
                       f"10% of the pod's CPU (up to {max(r['other_pct'] for r in busy):.0f}%)")
    if args.syscalls == "strace":
        out.append(STRACE_NOTE)
    return out


# ----------------------------------------------------------------------------- main

def parse_args(argv):
    ap = argparse.ArgumentParser(prog="bench.sh", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seat", action="store_true",
                    help=f"the proxy's seat beside the app: unless given, --targets {SEAT} --phases open "
                         f"--rate 320 --rounds 5")
    ap.add_argument("--gzip", action="store_true",
                    help=f"gzip in Python against gzip in gatehouse: unless given, --targets {GZIP}")
    ap.add_argument("--gzip-level", type=int, choices=sorted(COMPRESS_LEVELS), default=6,
                    help="the gzip-* targets' zlib level: Starlette's compresslevel and gatehouse's compress level "
                         "(1 fastest, 6 default, 9 best) (default 6)")
    ap.add_argument("--targets", help=f"comma list of {', '.join(TARGETS)}; the pod table's ratios are to the "
                                      f"first (default before,after)")
    ap.add_argument("--phases", help="comma list of closed (wrk) and open (h2load at --rate) (default both)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds per load (default 3)")
    ap.add_argument("--duration", type=int, default=10, help="seconds per window (default 10)")
    ap.add_argument("--warmup", type=int, default=3, help="closed-loop seconds per target before measuring (default 3)")
    ap.add_argument("--rate", type=float,
                    help="open-loop offered req/s (default: half the slowest target's closed-loop req/s)")
    ap.add_argument("--connections", type=int, default=16, help="wrk and h2load connections (default 16)")
    ap.add_argument("--syscalls", choices=SYSCALL_TOOLS,
                    help="also count the proxy's syscalls: perf (raw_syscalls:sys_enter; slows it a little) or "
                         "strace -c -f (slows it a lot: its CPU figures are then not comparable)")
    ap.add_argument("--pod-cpu", type=int, default=1, help="CPU for the apps and the proxies (default 1)")
    ap.add_argument("--load-cpu", type=int, default=0, help="CPU for wrk, h2load and this script (default 0)")
    ap.add_argument("--port-base", type=int, default=20300,
                    help="targets use base, base+10, base+20, ... (+1 app, +2 admin) (default 20300)")
    ap.add_argument("--binary", required=True,
                    help="gatehouse binary (bench.sh builds and passes target/release/gatehouse)")
    ap.add_argument("--venv", required=True, help="venv with requirements.txt (bench.sh sets it up)")
    ap.add_argument("--keep-workdir", action="store_true", help="keep logs and audit files")
    for tool in ("wrk", "h2load", "nginx"):
        ap.add_argument(f"--{tool}", default=shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin")
                        or tool, help=f"{tool} executable (default: on PATH)")
    args = ap.parse_args(argv)
    if args.seat and args.gzip:
        ap.error("--seat and --gzip are two runs: give one")
    seat = ({"targets": SEAT, "phases": "open", "rate": 320, "rounds": 5} if args.seat else
            {"targets": GZIP} if args.gzip else {})
    for key, default in (("targets", "before,after"), ("phases", "closed,open"), ("rate", 0), ("rounds", 3)):
        if getattr(args, key) is None:
            setattr(args, key, seat.get(key, default))
    names = [n for n in args.targets.split(",") if n]
    bad = [n for n in names if n not in TARGETS]
    if bad or not names or len(set(names)) != len(names):
        ap.error(f"--targets: a comma list of distinct {', '.join(TARGETS)}, got {args.targets!r}")
    phases = [p for p in args.phases.split(",") if p]
    if not phases or set(phases) - {"closed", "open"}:
        ap.error(f"--phases: closed, open or both, got {args.phases!r}")
    if phases == ["open"] and not args.rate:
        ap.error("--phases open needs --rate (the default rate comes from the closed loop)")
    if args.rounds < 1 or args.duration < 1 or args.warmup < 0 or args.rate < 0 or args.connections < 1:
        ap.error("--rounds, --duration and --connections must be at least 1, --warmup and --rate not negative")
    usable = os.sched_getaffinity(0)
    if args.pod_cpu == args.load_cpu or not {args.pod_cpu, args.load_cpu} <= usable:
        ap.error(f"--pod-cpu and --load-cpu must be two distinct CPUs of {sorted(usable)}")
    args.names = names
    args.phase_list = [p for p in ("closed", "open") if p in phases]
    args.binary = os.path.abspath(args.binary)  # gatehouse runs in the work dir
    return args


def main(argv):
    args = parse_args(argv)
    tools = [args.wrk, args.h2load, "taskset"] + ([args.nginx] if any(TARGETS[n][3] == "nginx" for n in args.names)
                                                  else []) + ([args.syscalls] if args.syscalls else [])
    for tool in tools:
        if not shutil.which(tool):
            log(f"bench: {tool} not found (bench.sh installs wrk, h2load, taskset, nginx and strace; perf is "
                f"Debian's linux-perf)")
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
    os.chmod(workdir, 0o755)  # nginx's worker runs as nobody and connects to the apps' sockets here
    os.makedirs(os.path.join(workdir, "tmp"))
    launcher = Launcher(workdir)
    log(f"bench: work dir {workdir}; load average {load_start}")
    targets = []
    try:
        for i, name in enumerate(args.names):
            log(f"bench: start {name} (CPU {args.pod_cpu})")
            targets.append(start_target(name, i, args, workdir, launcher))
        problems = check(targets)
        if problems:
            raise BenchError("check before measuring failed:\n- " + "\n- ".join(problems))
        log("bench: checked: " + "; ".join(
            what for what, any_of in (("same header names, request id reaches the app, one audit line per request",
                                       any(t.chain for t in targets)),
                                      ("the same JSON, gzip-coded", any(t.gzip for t in targets)),
                                      ("the app's body and the proxy's header", any(not t.chain and not t.gzip
                                                                                   for t in targets)))
            if any_of))
        for t in targets:
            if args.warmup:
                load(t, "closed", args.warmup, args, workdir, f"{t.name}-warmup")
        if "closed" in args.phase_list:
            run_rounds(targets, "closed", args, workdir)
        if "open" in args.phase_list:
            if not args.rate:
                slowest = min(med([r["rps"] for r in t.closed]) for t in targets)
                args.rate = max(10, int(slowest / 2 / 10) * 10)
            log(f"bench: open loop at {args.rate:,.0f} req/s")
            run_rounds(targets, "open", args, workdir)
        audit = {t.name: audit_counts(t, launcher) for t in targets if t.audit_file}
    except (BenchError, OSError, http.client.HTTPException) as e:
        log(f"bench: FAILED: {e!r}" if not isinstance(e, BenchError) else f"bench: FAILED: {e}")
        return 1
    finally:
        launcher.stop_all()
        if args.keep_workdir:
            log(f"bench: kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    python = subprocess.run([os.path.join(args.venv, "bin", "python"), "-c",
                             "import importlib.metadata as m, os, sys; print(sys.version.split()[0], "
                             "os.path.realpath(sys.executable), m.version('fastapi'), m.version('uvicorn'))"],
                            capture_output=True, text=True).stdout.split()
    nginx = subprocess.run([args.nginx, "-v"], capture_output=True, text=True).stderr.strip() \
        if any(t.proxy == "nginx" for t in targets) else None
    print(f"FastAPI example, {' vs '.join(args.names)}: Python {python[0]} ({python[1]}), fastapi {python[2]}, "
          f"uvicorn {python[3]} (one worker, same options), gatehouse `{args.binary}`"
          + (f", {nginx}" if nginx else "") + f"; the pod on CPU {args.pod_cpu}, wrk/h2load on CPU {args.load_cpu}, "
          f"{args.connections} connections; "
          + (f"gzip level {args.gzip_level} (`compress` level `{COMPRESS_LEVELS[args.gzip_level]}`), GET {GZIP_PATH} "
             f"with accept-encoding: gzip; " if any(t.gzip for t in targets) else "")
          + f"{args.rounds} interleaved rounds of {args.duration} s per load; "
          f"medians (min–max); ratios are medians of per-round ratios.\n")
    print(pod_table(targets, args, audit))
    for n in notes(targets, args, audit):
        print(f"- {n}")
    for phase in args.phase_list:
        seat = seat_table(targets, args, phase)
        if seat:
            print(f"\nThe proxy in the seat, {rate_label(args, phase)} ({args.connections} connections; the "
                  f"proxy's processes alone, all threads; ÷ nginx is the median per-round ratio to nginx reaching "
                  f"the app the same way):\n")
            print(seat)
    print(f"\nMachine: {os.cpu_count()} CPUs, {cpu_model()}, Linux {platform.release()}; load average "
          f"{load_start} at start, {loadavg()} at end; "
          f"{time.monotonic() - started:.0f} s.")
    return 0


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def cpu_model():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
