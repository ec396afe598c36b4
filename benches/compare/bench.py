#!/usr/bin/env python3
"""gatehouse against nginx and haproxy, side by side: what one request costs each proxy.

Run through run.sh (see README.md in this folder):

    bash benches/compare/run.sh                                   # ~3 min; Markdown on stdout
    bash benches/compare/run.sh --rate 2000                       # at a fixed offered rate (h2load)
    bash benches/compare/run.sh --duration 2 --warmup 1 --rounds 1   # ~30 s smoke run

One upstream nginx (1 worker, a fixed 100-byte 200) and the load generator share --load-cpu;
each proxy runs alone on --proxy-cpu with one worker. Scenarios: `basic` (a proxy adding one
response header) and `full` (request id, timing header, API-key check, a per-client rate limit
that never fires, an audit line per request); and what gzip costs: `json` (the proxy with gzip
configured passing a ~20 KiB JSON body through uncompressed: the client sends no
Accept-Encoding) and `gzip1`, `gzip6`, `gzip9` (the same body gzip-coded at that zlib level:
nginx's `gzip on`, gatehouse's `compress`); and `wasm` (`basic` with gatehouse's header set by
a proxy-wasm plugin, plugin/, instead of the `headers` middleware); and `policy` (`full` with
an `authorize` policy of five rules for gatehouse). Every proxy is checked first (status, body,
headers, 401s, audit lines), then measured in interleaved rounds (A B C, A B C, ...): wrk's
closed loop, or h2load at one offered rate with --rate. A proxy's CPU per request is its CPU
clock over the window (every thread, exact to the ns; see benchlib.py) ÷ responses; ratios
are medians of per-round ratios to nginx (paired, so drift cancels). Stdlib only.
"""

import argparse
import datetime
import gzip
import http.client
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from benchlib import (STRACE_NOTE, SYSCALL_TOOLS, BenchError, Launcher, Window, all_proc_ticks, cell, connector, core_times,
                      fmt, fmt_ratio, h2load, log, markdown, med, paired_ratio, port_free, process_tree, render,
                      tree_cpu_s, tree_mem_kib, wait_until, wrk)

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(HERE, "configs")

# 99 printable bytes + newline. No '$', '"', ';' or '\' (it is an nginx string).
BODY_TEXT = ("gatehouse-bench upstream: fixed body so that proxy work, not payload size, dominates the cost."
             + "." * 99)[:99]
BODY = (BODY_TEXT + "\n").encode()
API_KEY = "bench-7f3c2a91d4e8b6c05a1f"  # the `full` scenario's secret
RATE_PER_SEC = 1000000                   # per-client limit far above any offered load: never fires
RATE_BURST = 1000000

# The gzip scenarios' body: ~20 KiB of JSON, a list endpoint's page (the upstream serves it
# as a file at JSON_PATH).
JSON_BODY = json.dumps({"items": [{"id": i, "sku": f"SKU-{i:06d}", "name": f"item {i}",
                                   "description": f"A sturdy item number {i}, shipped in a recyclable box.",
                                   "price_cents": 199 + 37 * i, "in_stock": i % 3 != 0,
                                   "tags": ["catalog", f"group-{i % 7}", "sale" if i % 5 == 0 else "regular"]}
                                  for i in range(108)], "page": 1, "next": "/catalog?page=2"},
                       separators=(",", ":")).encode()
JSON_PATH = "/catalog.json"
# scenario -> zlib level: nginx's gzip_comp_level, and gatehouse's compress level of that zlib
# level (docs/middleware/compress.md); `json` is configured at 6 but not asked for gzip.
GZIP_LEVELS = {"json": 6, "gzip1": 1, "gzip6": 6, "gzip9": 9}
COMPRESS_LEVELS = {1: "fastest", 6: "default", 9: "best"}

SCENARIOS = {"basic": ["direct", "nginx", "haproxy", "gatehouse"], "full": ["nginx", "haproxy", "gatehouse"],
             **{s: ["nginx", "gatehouse"] for s in GZIP_LEVELS}, "wasm": ["nginx", "gatehouse"],
             "policy": ["nginx", "gatehouse"]}
# `full` and what is measured against it: `policy` is `full` with an `authorize` for gatehouse.
FULL = {"full", "policy"}
PORT_OFFSETS = {"nginx": 1, "haproxy": 2, "gatehouse": 3}  # + the scenario's block + --port-base
SCENARIO_BLOCK = {"basic": 10, "full": 20, "json": 30, "gzip1": 40, "gzip6": 50, "gzip9": 60, "wasm": 70, "policy": 80}
# Response headers each proxy must add to a 200: one that skips the work gets no number.
EXPECT = {"basic": ["x-bench-proxy"], "wasm": ["x-bench-proxy"], "full": ["x-request-id", "x-response-time"],
          "policy": ["x-request-id", "x-response-time"], "json": [],
          **{s: ["content-encoding", "vary"] for s in GZIP_LEVELS if s != "json"}}


def template(scenario, proxy):
    """configs/<this>-<proxy>.*: the gzip scenarios share one, filled with their level; `wasm`
    is `basic` with gatehouse's header set by a plugin, so the others run their `basic`;
    `policy` is `full` with an `authorize` policy, so the others run their `full`."""
    if scenario == "wasm":
        return "wasm" if proxy == "gatehouse" else "basic"
    if scenario == "policy":
        return "policy" if proxy == "gatehouse" else "full"
    return "gzip" if scenario in GZIP_LEVELS else scenario


def build_plugin():
    """The `wasm` scenario's plugin (plugin/), built for wasm32-wasip1 under target/."""
    target_dir = os.path.join(HERE, "..", "..", "target", "bench-plugin")
    out = subprocess.run(["cargo", "build", "--release", "--quiet", "--target", "wasm32-wasip1",
                          "--manifest-path", os.path.join(HERE, "plugin", "Cargo.toml")],
                         env=dict(os.environ, CARGO_TARGET_DIR=target_dir), capture_output=True, text=True)
    if out.returncode != 0:
        raise BenchError("the wasm scenario's plugin did not build (is the target installed? "
                         f"rustup target add wasm32-wasip1):\n{out.stderr[-2000:]}")
    return os.path.abspath(os.path.join(target_dir, "wasm32-wasip1", "release", "bench_header.wasm"))


def request_headers(scenario):
    return ({"x-api-key": API_KEY} if scenario in FULL else
            {"accept-encoding": "gzip"} if scenario in GZIP_LEVELS and scenario != "json" else {})


class Target:
    def __init__(self, scenario, name, port, proc=None, audit_file=None):
        self.scenario, self.name, self.port, self.proc, self.audit_file = scenario, name, port, proc, audit_file
        self.rounds, self.errors, self.discarded = [], [], []
        self.requests_sent = 0
        self.audit = None
        self.body_bytes = None  # the checked response's body as sent


# ----------------------------------------------------------------------------- targets

def start_target(scenario, name, args, workdir, launcher):
    port = args.port_base + SCENARIO_BLOCK[scenario] + PORT_OFFSETS[name]
    tag = f"{scenario}-{name}"
    audit_file = os.path.join(workdir, f"{tag}.audit.jsonl") if scenario in FULL else None
    values = {"WORKDIR": workdir, "NAME": tag, "LISTEN_PORT": port, "UPSTREAM_SERVER": f"127.0.0.1:{args.port_base}",
              "UPSTREAM_URL": f"http://127.0.0.1:{args.port_base}", "API_KEY": API_KEY,
              "LOG_FILE": audit_file or "/dev/null", "RATE_PER_SEC": RATE_PER_SEC, "RATE_BURST": RATE_BURST,
              "NGINX_LOG_BUFFER": " buffer=64k flush=1s" if args.nginx_log_buffer else "",
              "GZIP_LEVEL": GZIP_LEVELS.get(scenario, 6),
              "COMPRESS_LEVEL": COMPRESS_LEVELS[GZIP_LEVELS.get(scenario, 6)],
              "WASM_PLUGIN": args.wasm_plugin or ""}
    stdout_path = env = None
    if name == "nginx":
        conf = render(os.path.join(CONFIGS, f"{template(scenario, name)}-nginx.conf"), values, os.path.join(workdir, f"{tag}.conf"))
        argv = [args.nginx, "-p", workdir, "-c", conf, "-e", os.path.join(workdir, f"{tag}.error.log")]
    elif name == "haproxy":
        conf = render(os.path.join(CONFIGS, f"{template(scenario, name)}-haproxy.cfg"), values, os.path.join(workdir, f"{tag}.cfg"))
        argv = [args.haproxy, "-db", "-f", conf]
        stdout_path = audit_file  # haproxy logs to stdout only: in `full` stdout is the audit file
    else:
        conf = render(os.path.join(CONFIGS, f"{template(scenario, name)}-gatehouse.toml"), values,
                      os.path.join(workdir, f"{tag}.toml"))
        argv = [args.binary, "run", "--config", conf]
        env = {"RUST_LOG": "warn"}  # overrides [log].level: no per-request lines, as the others
        chk = subprocess.run([args.binary, "check", "--config", conf], capture_output=True, text=True,
                             env=dict(os.environ, **env), timeout=30)
        if chk.returncode != 0:
            raise BenchError(f"`gatehouse check` rejected {conf} (from configs/{template(scenario, name)}-gatehouse.toml): "
                             f"the template does not match this gatehouse:\n{(chk.stdout + chk.stderr)[-2000:]}")
    p = launcher.start(tag, argv, args.proxy_cpu, env=env, stdout_path=stdout_path)
    wait_until(p, connector(port), f"listening on 127.0.0.1:{port}")
    return Target(scenario, name, port, p, audit_file)


def path(scenario):
    return JSON_PATH if scenario in GZIP_LEVELS else "/"


def http_get(port, headers=None, url_path="/"):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request("GET", url_path, headers=headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def sanity_check(t):
    """Before measuring: the upstream's body, the headers the proxy adds, and in `full` a 401
    without or with a wrong key."""
    problems = []
    try:
        if t.scenario in FULL:
            for headers in ({}, {"x-api-key": API_KEY + "-wrong"}):
                st, _, _ = http_get(t.port, headers)
                t.requests_sent += 1
                if st != 401:
                    problems.append(f"x-api-key {headers.get('x-api-key', '(none)')} -> {st}, want 401")
        st, hdrs, body = http_get(t.port, request_headers(t.scenario), path(t.scenario))
        t.requests_sent += 1
    except (OSError, http.client.HTTPException) as e:
        return [f"request failed: {e!r}"]
    if st != 200:
        problems.append(f"GET {path(t.scenario)} -> {st}, want 200")
    coded = "accept-encoding" in request_headers(t.scenario)
    if coded and hdrs.get("content-encoding") != "gzip":
        problems.append(f"content-encoding {hdrs.get('content-encoding')!r}, want gzip")
    elif not coded and "content-encoding" in hdrs:
        problems.append(f"content-encoding {hdrs['content-encoding']!r} without accept-encoding")
    else:
        try:
            decoded = gzip.decompress(body) if coded else body
        except (OSError, EOFError) as e:
            decoded = None
            problems.append(f"the body is not gzip: {e}")
        t.body_bytes = len(body)  # as sent: the compression ratio is JSON_BODY's length over this
        if decoded is not None and decoded != (JSON_BODY if t.scenario in GZIP_LEVELS else BODY):
            problems.append(f"the body is not the upstream's ({len(body)} bytes)")
    problems += [f"no {h} response header" for h in EXPECT[t.scenario] if t.name != "direct" and h not in hdrs]
    return problems


# ----------------------------------------------------------------------------- measuring

def run_load(t, seconds, args, workdir, tag):
    url = f"http://127.0.0.1:{t.port}{path(t.scenario)}"
    headers = [f"{k}: {v}" for k, v in request_headers(t.scenario).items()]
    if args.rate:
        return h2load(url, args.rate, seconds, args.connections, args.load_cpu,
                      os.path.join(workdir, f"{tag}.requests.tsv"), headers, args.h2load)
    return wrk(url, seconds, args.connections, args.load_cpu, headers, args.threads, args.wrk)


def measure(t, upstream, args, workdir, tag):
    """One window: the load generator's figures, the proxy's CPU, context switches (and with
    --syscalls its syscalls), the upstream's CPU, each core's busy share and who else ran."""
    others0, cores0, up0 = all_proc_ticks(), core_times(), tree_cpu_s([upstream.pid])
    w0 = time.monotonic()
    if t.proc:
        with Window([t.proc.pid], args.syscalls, workdir) as win:
            r = run_load(t, args.duration, args, workdir, tag)
    else:
        win, r = None, run_load(t, args.duration, args, workdir, tag)
    wall = time.monotonic() - w0
    up, cores1, others1 = tree_cpu_s([upstream.pid]) - up0, core_times(), all_proc_ticks()
    n = r["requests"] or 1
    t.requests_sent += r["requests"]
    r.update(rps=r["requests"] / r["seconds"], upstream_us=up * 1e6 / n, wall_s=round(wall, 2))
    for cpu in (args.proxy_cpu, args.load_cpu):
        busy, steal, total = (b - a for a, b in zip(cores0[cpu], cores1[cpu]))
        r[f"cpu{cpu}_busy_pct"] = 100 * busy / total if total else None
        r[f"cpu{cpu}_steal_pct"] = 100 * steal / total if total else None
    if win:
        r.update(cpu_us=win.cpu_s * 1e6 / n, switches=win.switches / n, proxy_pct=100 * win.cpu_s / wall,
                 thread_churn=win.churn, exited_cpu_pct=100 * win.exited_cpu_s / wall,
                 threads=[(comm, round(pct, 1)) for comm, pct in win.busiest(wall)],
                 peak_rss_mib=tree_mem_kib([t.proc.pid]) / 1024)
        if win.syscalls is not None:
            r["syscalls"] = win.syscalls / n
    # what else ran on each core besides the measured processes (idle peers, other tenants)
    ours = set(process_tree([upstream.pid] + ([t.proc.pid] if t.proc else []))) | {os.getpid()}
    busy_proxy = r[f"cpu{args.proxy_cpu}_busy_pct"]
    if busy_proxy is not None:
        r["proxy_core_other_pct"] = max(0.0, busy_proxy - r.get("proxy_pct", 0))
    r["other_processes"] = sorted(
        ((comm, 100 * (ticks - others0[pid][1]) / os.sysconf("SC_CLK_TCK") / wall)
         for pid, (comm, ticks) in others1.items() if pid in others0 and pid not in ours
         and ticks - others0[pid][1] > 0), key=lambda x: -x[1])[:3]
    r["other_pct"] = sum(pct for _, pct in r["other_processes"])
    return r


def measure_clean(t, upstream, args, workdir, rnd):
    """A window, measured again (within --retries and the run's --retry-budget) while other
    processes took more than --max-other % of a core; the cleanest try is kept."""
    tries = []
    for attempt in range(1, args.retries + 2):
        r = measure(t, upstream, args, workdir, f"{t.scenario}-{t.name}-r{rnd}-{attempt}")
        tries.append(r)
        if r["other_pct"] <= args.max_other or r["non2xx"] or r["socket_errors"]:
            break
        who = ", ".join(f"{comm} {pct:.0f}%" for comm, pct in r["other_processes"])
        if attempt > args.retries or args.retry_budget <= 0:
            log(f"  r{rnd} {t.name}: other processes used the machine ({who}); keeping the cleanest try")
            break
        log(f"  r{rnd} {t.name}: other processes used the machine ({who}); measuring again")
        args.retry_budget -= 1
    best = min(tries, key=lambda r: r["other_pct"])
    t.discarded += [r for r in tries if r is not best]
    return best


def check_audit(t):
    """After the proxy stopped (and flushed): about one JSON line per request sent."""
    try:
        with open(t.audit_file, "rb") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        lines = []
    t.audit = {"lines": len(lines), "requests": t.requests_sent}
    if not lines:
        t.errors.append("the audit file is empty")
        return
    try:
        json.loads(lines[0])
    except ValueError:
        t.errors.append(f"the audit file's first line is not JSON: {lines[0][:200]!r}")
    if len(lines) < 0.5 * t.requests_sent:
        t.errors.append(f"the audit file has {len(lines):,} lines for {t.requests_sent:,} requests")


def run_scenario(s, targets, upstream, args, workdir):
    for t in targets:
        problems = sanity_check(t)
        if problems:
            t.errors += problems
            log(f"  {t.name}: check failed: {'; '.join(problems)}")
        elif args.warmup:
            r = run_load(t, args.warmup, args, workdir, f"{s}-{t.name}-warmup")
            t.requests_sent += r["requests"]
    runnable = [t for t in targets if not t.errors]
    for rnd in range(1, args.rounds + 1):
        for t in runnable:  # interleaved: A B C, A B C, ...
            if upstream.poll() is not None:
                raise BenchError(f"the upstream nginx exited with {upstream.returncode}")
            if t.errors:
                continue
            r = measure_clean(t, upstream, args, workdir, rnd)
            r["round"] = rnd
            t.rounds.append(r)
            log(f"  r{rnd} {t.name:9s} {r['rps']:9,.0f} req/s  p50 {r['p50_ms']:.2f} p99 {r['p99_ms']:.2f} ms  "
                f"CPU {fmt(r.get('cpu_us'), 1)} µs/req  {fmt(r.get('switches'), 2)} cs/req  "
                + (f"{fmt(r['syscalls'], 1)} syscalls/req  " if "syscalls" in r else "")
                + f"proxy {fmt(r.get('proxy_pct'))}%  CPU{args.load_cpu} {fmt(r[f'cpu{args.load_cpu}_busy_pct'])}%")
            if r["non2xx"] or r["socket_errors"]:
                t.errors.append(f"round {rnd}: {r['non2xx']} non-2xx, {r['socket_errors']} socket errors")
            if t.proc and t.proc.poll() is not None:
                t.errors.append(f"exited with {t.proc.returncode} in round {rnd}")


# ----------------------------------------------------------------------------- summary

def table(scenario, targets, args):
    nginx = next((t for t in targets if t.name == "nginx" and t.rounds), None)
    direct = next((t for t in targets if t.name == "direct" and t.rounds), None)
    syscalls = any("syscalls" in r for t in targets for r in t.rounds)
    lat = f"h2load at {args.rate:,.0f} req/s" if args.rate else "wrk closed loop"
    head = ["target", "req/s", "p50 ms", "p99 ms", "CPU µs/req", "context switches/req",
            *(["syscalls/req"] if syscalls else []), "proxy CPU %", f"CPU{args.load_cpu} busy %",
            "peak RSS MiB", "CPU/req ÷ nginx", "req/s ÷ nginx", "p99 ÷ nginx", "req/s ÷ direct"]
    rows = []
    for t in targets:
        if not t.rounds:
            rows.append([t.name, "failed: see below" if t.errors else "not run", *([""] * (len(head) - 2))])
            continue
        ratio = (lambda ref, key: fmt_ratio(paired_ratio(t.rounds, ref.rounds, key)) if ref else "—")
        rows.append(["direct (no proxy)" if t.name == "direct" else t.name, cell(t.rounds, "rps"),
                     cell(t.rounds, "p50_ms", 2), cell(t.rounds, "p99_ms", 2), cell(t.rounds, "cpu_us", 1),
                     cell(t.rounds, "switches", 2), *([cell(t.rounds, "syscalls", 1)] if syscalls else []),
                     fmt(med([r.get("proxy_pct") for r in t.rounds])),
                     fmt(med([r[f"cpu{args.load_cpu}_busy_pct"] for r in t.rounds])),
                     fmt(max((r["peak_rss_mib"] for r in t.rounds if "peak_rss_mib" in r), default=None), 1),
                     ratio(nginx, "cpu_us"), ratio(nginx, "rps"), ratio(nginx, "p99_ms"),
                     "—" if t is direct else ratio(direct, "rps")])
    return (f"### `{scenario}`: {lat}, {args.connections} connections, {args.rounds} interleaved rounds of "
            f"{args.duration} s; medians (min–max); ratios are medians of per-round ratios\n\n"
            + markdown(head, rows))


def gzip_table(ran):
    """What gzip costs each proxy per KiB of JSON compressed: its CPU per request at each level,
    over the request's size in KiB, and over and above passing the body through (`json`)."""
    if not any(s in ran for s in GZIP_LEVELS if s != "json"):
        return None
    kib = len(JSON_BODY) / 1024
    plain = {t.name: med([r.get("cpu_us") for r in t.rounds]) for t in ran.get("json", [])}
    head = ["zlib level (gatehouse `level`)", "proxy", "body sent, bytes", "ratio", "CPU µs/req",
            "CPU µs per KiB of JSON", "… over passing it through (`json`)", "CPU/req ÷ nginx"]
    rows = []
    for s in (s for s in GZIP_LEVELS if s in ran):
        level = GZIP_LEVELS[s]
        nginx = next((t for t in ran[s] if t.name == "nginx" and t.rounds), None)
        for t in (t for t in ran[s] if t.rounds):
            cpu = med([r.get("cpu_us") for r in t.rounds])
            extra = (cpu - plain[t.name]) / kib if s != "json" and cpu and plain.get(t.name) else None
            rows.append([f"`{s}`: not asked (identity)" if s == "json" else f"{level} (`{COMPRESS_LEVELS[level]}`)",
                         t.name, fmt(t.body_bytes), fmt(len(JSON_BODY) / t.body_bytes, 2) if t.body_bytes else "—",
                         cell(t.rounds, "cpu_us", 1), fmt(cpu / kib, 2) if cpu else "—", fmt(extra, 2),
                         "—" if t is nginx or not nginx else fmt_ratio(paired_ratio(t.rounds, nginx.rounds, "cpu_us"))])
    return (f"### gzip: CPU per KiB compressed ({len(JSON_BODY):,} bytes of JSON per response; the proxy's CPU, "
            f"medians over rounds)\n\n" + markdown(head, rows))


def notes(targets, args):
    out = []
    for t in targets:
        if not t.rounds:
            continue
        proxy = med([r.get("proxy_pct") for r in t.rounds])
        load = med([r[f"cpu{args.load_cpu}_busy_pct"] for r in t.rounds])
        rps = med([r["rps"] for r in t.rounds])
        if args.rate and rps < 0.97 * args.rate:
            out.append(f"{t.name} held only {rps:,.0f} of the {args.rate:,.0f} req/s offered: its figures are not at "
                       f"the others' load (lower --rate)")
        elif not args.rate and proxy is not None and proxy < 90:
            out.append(f"{t.name}: the proxy used {proxy:.0f}% of its core with CPU{args.load_cpu} {fmt(load)}% busy: "
                       f"req/s understates it; CPU µs/req still holds (a little high when unsaturated): compare at "
                       f"equal load with --rate")
        values = [r["cpu_us"] for r in t.rounds if r.get("cpu_us")]
        if len(values) > 1 and max(values) > 1.15 * min(values):
            out.append(f"{t.name}: CPU µs/req varied {min(values):,.1f}–{max(values):,.1f} over rounds (>15%): a noisy "
                       f"machine; add --rounds")
        extra = [r for r in t.rounds if sum(p for _, p in r.get("threads", [])[1:]) >= 2]
        if extra:  # counted in CPU µs/req; worth knowing which threads besides the request's worked
            r = extra[0]
            out.append(f"{t.name}: besides its busiest thread ({r['threads'][0][0]} {r['threads'][0][1]:.0f}%) "
                       + ", ".join(f"{c} {p:.1f}%" for c, p in r["threads"][1:] if p >= 0.5)
                       + f" of a core in round {r['round']}, counted in its CPU µs/req")
        if any(r.get("thread_churn") for r in t.rounds):
            out.append(f"{t.name}: threads exited during a window: their CPU is counted (the process clock keeps it), "
                       f"their context switches only in part, so its context switches/req is a lower bound")
        disturbed = [r for r in t.rounds if r["other_pct"] > args.max_other]
        if disturbed:
            who = ", ".join(f"{c} {p:.0f}%" for c, p in disturbed[0]["other_processes"])
            out.append(f"{t.name}: {len(disturbed)} of {len(t.rounds)} windows kept were disturbed by other processes "
                       f"({who}): treat its figures as noisy")
        steal = max(max(r[f"cpu{c}_steal_pct"] or 0 for c in (args.proxy_cpu, args.load_cpu)) for r in t.rounds)
        if steal > 5:
            out.append(f"{t.name}: hypervisor steal up to {steal:.0f}%: req/s is depressed, CPU µs/req is not")
        if t.audit and t.audit["lines"] < 0.99 * t.audit["requests"]:
            out.append(f"{t.name}: {t.audit['lines']:,} audit lines for {t.audit['requests']:,} requests: it dropped "
                       f"events, so it did less work")
    if args.syscalls == "strace":
        out.append(STRACE_NOTE)
    return out


def versions(args):
    def first_line(argv):
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (p.stdout + p.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return None
    return {"nginx": first_line([args.nginx, "-v"]), "haproxy": first_line([args.haproxy, "-v"]),
            "gatehouse": first_line([args.binary, "--version"]), "wrk": first_line([args.wrk, "-v"]),
            "h2load": first_line([args.h2load, "--version"])}


# ----------------------------------------------------------------------------- main

def parse_args(argv):
    ap = argparse.ArgumentParser(prog="run.sh", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=os.path.join(HERE, "..", "..", "target", "release", "gatehouse"),
                    help="gatehouse binary (default: this checkout's target/release/gatehouse, which run.sh builds)")
    ap.add_argument("--scenarios", default="basic,full",
                    help=f"comma list of {', '.join(SCENARIOS)} (default basic,full); gzip is json,gzip1,gzip6,gzip9")
    ap.add_argument("--targets", default="direct,nginx,haproxy,gatehouse",
                    help="comma list of direct, nginx, haproxy, gatehouse (default all)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--duration", type=int, default=8, help="seconds per window (default 8)")
    ap.add_argument("--warmup", type=int, default=2, help="seconds of load per target before measuring (default 2)")
    ap.add_argument("--rate", type=float, default=0,
                    help="offer this many req/s in total with h2load (open loop) instead of wrk's closed loop")
    ap.add_argument("--connections", type=int, default=64, help="load connections (default 64)")
    ap.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    ap.add_argument("--syscalls", choices=SYSCALL_TOOLS,
                    help="also count the proxy's syscalls per request with perf (raw_syscalls:sys_enter) or strace "
                         "-c -f; both slow the proxy down (strace by far), so this is a run of its own")
    ap.add_argument("--proxy-cpu", type=int, default=1, help="the proxies' CPU (default 1)")
    ap.add_argument("--load-cpu", type=int, default=0, help="CPU for the load generator, the upstream and this "
                                                            "script (default 0)")
    ap.add_argument("--port-base", type=int, default=19100,
                    help="upstream port; proxies on base+11..base+23; below the ephemeral range (32768-), whose "
                         "ports the load's own connections may hold (default 19100)")
    ap.add_argument("--nginx-log-buffer", action=argparse.BooleanOptionalAction, default=True,
                    help="nginx's access_log buffer=64k flush=1s in `full` (default on)")
    ap.add_argument("--max-other", type=float, default=5.0,
                    help="measure a window again when other processes took more than this %% of a core (default 5)")
    ap.add_argument("--retries", type=int, default=2, help="re-measurements per disturbed window (default 2)")
    ap.add_argument("--retry-budget", type=int, default=4, help="re-measurements per run (default 4)")
    ap.add_argument("--json", default=os.path.join(tempfile.gettempdir(), "gatehouse-compare-latest.json"),
                    help="every round's figures (default: $TMPDIR/gatehouse-compare-latest.json)")
    ap.add_argument("--keep-workdir", action="store_true", help="keep rendered configs, logs and audit files")
    for tool in ("nginx", "haproxy", "wrk", "h2load"):
        ap.add_argument(f"--{tool}", default=shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin")
                        or tool, help=f"{tool} executable (default: on PATH)")
    args = ap.parse_args(argv)
    args.scenario_list = [x for s in args.scenarios.split(",") if s
                          for x in (GZIP_LEVELS if s == "gzip" else [s])]
    args.target_list = [t for t in args.targets.split(",") if t]
    if not args.scenario_list or set(args.scenario_list) - set(SCENARIOS):
        ap.error(f"--scenarios: a comma list of {', '.join(SCENARIOS)}, got {args.scenarios!r}")
    if not args.target_list or set(args.target_list) - set(SCENARIOS["basic"]):
        ap.error(f"--targets: a comma list of {', '.join(SCENARIOS['basic'])}, got {args.targets!r}")
    if args.rounds < 1 or args.duration < 1 or args.warmup < 0 or args.rate < 0 or args.connections < 1:
        ap.error("--rounds, --duration and --connections must be at least 1, --warmup and --rate not negative")
    usable = os.sched_getaffinity(0)
    if args.proxy_cpu == args.load_cpu or not {args.proxy_cpu, args.load_cpu} <= usable:
        ap.error(f"--proxy-cpu and --load-cpu must be two distinct CPUs of {sorted(usable)}")
    args.binary = os.path.abspath(args.binary)
    return args


def main(argv):
    args = parse_args(argv)
    need = ["nginx", "taskset", "h2load" if args.rate else "wrk"]
    need += ["haproxy"] if "haproxy" in args.target_list else []
    need += [args.syscalls] if args.syscalls else []
    missing = [tool for tool in need if not shutil.which(getattr(args, tool, tool))]
    if missing:
        log(f"bench: {', '.join(missing)} not found: `bash benches/compare/install.sh` installs them"
            + (" (perf: Debian's linux-perf, matching the kernel)" if "perf" in missing else ""))
        return 2
    if "gatehouse" in args.target_list and not os.access(args.binary, os.X_OK):
        log(f"bench: no gatehouse binary at {args.binary}: `cargo build --release`, or --binary PATH")
        return 2
    args.wasm_plugin = None
    if "wasm" in args.scenario_list and "gatehouse" in args.target_list:
        try:
            args.wasm_plugin = build_plugin()
        except BenchError as e:
            log(f"bench: {e}")
            return 2
    ports = [args.port_base] + [args.port_base + SCENARIO_BLOCK[s] + PORT_OFFSETS[n]
                                for s in args.scenario_list for n in SCENARIOS[s] if n in PORT_OFFSETS]
    busy = [p for p in ports if not port_free(p)]
    if busy:
        log(f"bench: 127.0.0.1 ports {busy} are in use: pick another --port-base")
        return 3
    started = time.monotonic()
    os.sched_setaffinity(0, {args.load_cpu})  # this script stays off the proxy's core
    workdir = tempfile.mkdtemp(prefix="gatehouse-compare.")
    os.chmod(workdir, 0o755)  # nginx's workers run as nobody
    os.makedirs(os.path.join(workdir, "tmp"))
    launcher = Launcher(workdir)
    log(f"bench: work dir {workdir}")
    result = {"meta": {"started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "kernel": platform.release(), "cpus": os.cpu_count(), "proxy_cpu": args.proxy_cpu,
                       "load_cpu": args.load_cpu, "rate": args.rate or None, "rounds": args.rounds,
                       "duration_s": args.duration, "connections": args.connections, "syscalls": args.syscalls,
                       "versions": versions(args)},
              "scenarios": {}}
    failures, ran = [], {}
    try:
        os.makedirs(os.path.join(workdir, "static"))
        with open(os.path.join(workdir, "static", JSON_PATH.lstrip("/")), "wb") as f:
            f.write(JSON_BODY)
        conf = render(os.path.join(CONFIGS, "upstream-nginx.conf"),
                      {"WORKDIR": workdir, "UPSTREAM_PORT": args.port_base, "BODY": BODY_TEXT + "\\n"},
                      os.path.join(workdir, "upstream.conf"))
        upstream = launcher.start("upstream", [args.nginx, "-p", workdir, "-c", conf, "-e",
                                               os.path.join(workdir, "upstream.error.log")], args.load_cpu)
        wait_until(upstream, connector(args.port_base), "listening")
        if http_get(args.port_base)[2] != BODY or http_get(args.port_base, url_path=JSON_PATH)[2] != JSON_BODY:
            raise BenchError("the upstream nginx does not answer with the fixed bodies")
        for s in args.scenario_list:
            log(f"bench: scenario {s}")
            targets = []
            for name in SCENARIOS[s]:
                if name not in args.target_list:
                    continue
                if name == "direct":
                    targets.append(Target(s, name, args.port_base))
                    continue
                log(f"  start {name} (CPU {args.proxy_cpu})")
                targets.append(start_target(s, name, args, workdir, launcher))
            run_scenario(s, targets, upstream, args, workdir)
            ran[s] = targets
            for t in targets:  # stopping flushes the audit files before they are counted
                if t.proc:
                    launcher.stop(t.proc)
                if t.audit_file and t.rounds:
                    check_audit(t)
            print(("\n" if s != args.scenario_list[0] else "") + table(s, targets, args))
            scenario_notes = notes(targets, args)
            for n in scenario_notes:
                print(f"- {n}")
            result["scenarios"][s] = {"notes": scenario_notes, "targets": {
                t.name: {"rounds": t.rounds, "discarded": t.discarded, "errors": t.errors, "audit": t.audit}
                for t in targets}}
            failures += [f"{s}/{t.name}: {e}" for t in targets for e in t.errors]
        costs = gzip_table(ran)
        if costs:
            print("\n" + costs)
    except (BenchError, OSError, http.client.HTTPException) as e:
        failures.append(str(e) if isinstance(e, BenchError) else repr(e))
    finally:
        launcher.stop_all()
        if args.keep_workdir:
            log(f"bench: kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    result["failures"] = failures
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nMachine: {os.cpu_count()} CPUs, Linux {platform.release()}; gatehouse `{args.binary}`; "
          f"{time.monotonic() - started:.0f} s; every figure in {args.json}")
    if failures:
        print("\n**FAILED:**\n" + "\n".join(f"- {f}" for f in failures))
        return 1
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
