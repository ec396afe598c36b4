#!/usr/bin/env python3
"""gRPC unary calls through gatehouse (upstream.protocol = "h2c") and through nginx's
grpc_pass, side by side. Stdlib only; run it as `bash deploy/examples/grpc/bench.sh`.

The approach of benches/compare: the proxy under test runs alone on one core (taskset), the
load generator (h2load) and the upstream on the other; both proxies run one worker; rounds
are interleaved (gatehouse, nginx, gatehouse, nginx...) so drift hits both; the proxy's CPU
time (utime+stime of its process tree, /proc/PID/stat) over a measured window divided by
the calls answered in it is the headline figure, with p50/p99 from h2load's per-request
log; ratios are the median of per-round ratios. A window in which anything else used more
than --max-other % of the proxy's core is measured again (--retries), keeping the cleanest.

The upstream is an nginx answering every call with one fixed gRPC message and the trailer
grpc-status: 0 (a static file, so the upstream costs the same for both proxies); each call
is a POST of one fixed gRPC frame (Echo{text: "hello"}) over h2c. Each proxy is checked
first: 200, the upstream's exact message, grpc-status 0 in the trailers, and the header it
adds (x-bench-proxy).
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
PATH = "/demo.v1.Demo/Echo"
# Echo(Message{text: "hello"}): the 5-byte gRPC prefix (uncompressed, length 7), then protobuf.
REQUEST = b"\x00\x00\x00\x00\x07\x0a\x05hello"
# The answer: Message{text: 92 bytes}, 100 bytes with its prefix, as benches/compare's upstream answers.
TEXT = (b"gatehouse-bench grpc upstream: a fixed message so that proxy work, not payload, counts" + b"." * 92)[:92]
REPLY_MESSAGE = b"\x0a" + bytes([len(TEXT)]) + TEXT
REPLY = b"\x00" + len(REPLY_MESSAGE).to_bytes(4, "big") + REPLY_MESSAGE
assert len(REPLY) == 99

STARTED = []


def log(msg):
    print(msg, file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# ---------------------------------------------------------------------------- /proc

def ticks_of(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    rest = data[data.rfind(")") + 2:].split()
    return int(rest[1]), sum(int(x) for x in rest[11:15])  # ppid, utime+stime+cutime+cstime


def tree(root):
    children = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = ticks_of(int(name))
            if st:
                children.setdefault(st[0], []).append(int(name))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        if p not in out:
            out.append(p)
            todo.extend(children.get(p, []))
    return out


def tree_ticks(root):
    return sum((ticks_of(p) or (0, 0))[1] for p in tree(root))


def tree_hwm_kib(root):
    total = 0
    for pid in tree(root):
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next((int(l.split()[1]) for l in f if l.startswith("VmHWM:")), 0)
        except OSError:
            pass
    return total


def cpu_times():
    """{cpu: (busy, total)} ticks from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and not line.startswith("cpu "):
                v = [int(x) for x in line.split()[1:]] + [0] * 8
                busy = v[0] + v[1] + v[2] + v[5] + v[6]
                out[int(line.split()[0][3:])] = (busy, busy + v[3] + v[4] + v[7])
    return out


# ---------------------------------------------------------------------------- processes

def start(name, argv, cpu, workdir, env=None):
    out = open(os.path.join(workdir, f"{name}.log"), "ab")
    p = subprocess.Popen(["taskset", "-c", str(cpu)] + argv, stdin=subprocess.DEVNULL,
                         stdout=out, stderr=subprocess.STDOUT, cwd=workdir,
                         env=dict(os.environ, **(env or {})), start_new_session=True)
    out.close()
    p.name = name
    STARTED.append(p)
    return p


def stop(p):
    """SIGTERM the process group made for p (its pid), then SIGKILL what is left."""
    try:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(8)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        p.wait(2)
    except subprocess.TimeoutExpired:
        pass
    if p in STARTED:
        STARTED.remove(p)


def wait_listening(p, port, workdir):
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise BenchError(f"{p.name} exited with {p.returncode}:\n{tail(workdir, p.name)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"{p.name} did not listen on 127.0.0.1:{port}:\n{tail(workdir, p.name)}")


def tail(workdir, name, n=15):
    try:
        with open(os.path.join(workdir, f"{name}.log"), errors="replace") as f:
            return "\n".join(f.read().splitlines()[-n:])
    except OSError:
        return ""


def port_free(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


# ---------------------------------------------------------------------------- configs

def write(workdir, name, text):
    path = os.path.join(workdir, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def upstream_conf(workdir, port):
    return write(workdir, "upstream.conf", f"""
worker_processes 1;
daemon off;
pid {workdir}/upstream.pid;
error_log {workdir}/upstream.error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  server {{
    listen 127.0.0.1:{port} http2;
    http2_max_concurrent_streams 1024;
    keepalive_requests 100000000;
    etag off;
    location / {{
      # The request body is read before the answer (a mirror subrequest waits for it): an
      # answer that left it unread would be followed by frames for a closed stream, which
      # nginx's grpc_pass takes for an error.
      mirror /read-body;
      mirror_request_body on;
      root {workdir};
      default_type application/grpc;
      try_files /reply.bin =404;
      error_page 405 =200 $uri;   # POST to a static file
      add_trailer grpc-status 0 always;
    }}
    location = /read-body {{
      internal;
      return 204;
    }}
  }}
}}
""")


def nginx_conf(workdir, port, upstream):
    return write(workdir, "nginx.conf", f"""
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx.error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  upstream app {{
    server 127.0.0.1:{upstream};
    keepalive 256;
    keepalive_requests 100000000;
  }}
  server {{
    listen 127.0.0.1:{port} http2;
    http2_max_concurrent_streams 1024;
    keepalive_requests 100000000;
    location / {{
      grpc_pass grpc://app;
      grpc_set_header Host $host;
      grpc_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      grpc_set_header X-Forwarded-Proto $scheme;
      grpc_set_header X-Forwarded-Host $host;
      add_header x-bench-proxy nginx;
    }}
  }}
}}
""")


def gatehouse_conf(workdir, port, upstream):
    return write(workdir, "gatehouse.toml", f"""
[server]
listen = "127.0.0.1:{port}"
workers = 1
idle_timeout = "10m"
shutdown_grace = "5s"

[upstream]
url = "http://127.0.0.1:{upstream}"
protocol = "h2c"
idle_timeout = "60s"

[log]
level = "warn"

[[middleware]]
type = "headers"
response = {{ set = {{ "x-bench-proxy" = "gatehouse" }} }}
""")


# ---------------------------------------------------------------------------- checks and load

def check(name, port, args, workdir):
    """One call with nghttp: 200, the upstream's message, grpc-status 0, x-bench-proxy."""
    req = os.path.join(workdir, "request.bin")
    out = subprocess.run([args.nghttp, "-v", "-H", "content-type: application/grpc", "-H",
                          "te: trailers", "-d", req, f"http://127.0.0.1:{port}{PATH}"],
                         capture_output=True, timeout=20)
    text = out.stdout
    problems = []
    if b":status: 200" not in text:
        problems.append("no :status 200")
    if REPLY not in text:
        problems.append("the upstream's message did not come through")
    if b"grpc-status: 0" not in text:
        problems.append("no grpc-status: 0 trailer")
    if f"x-bench-proxy: {name}".encode() not in text:
        problems.append("no x-bench-proxy header")
    if problems:
        raise BenchError(f"{name} check failed ({'; '.join(problems)}):\n"
                         + text.decode(errors="replace")[-1500:])


def h2load(port, seconds, args, workdir, tag):
    logfile = os.path.join(workdir, f"{tag}.latency")
    argv = ["taskset", "-c", str(args.load_cpu), args.h2load, "-t1", f"-c{args.clients}",
            f"-m{args.streams}", "-D", str(seconds), "-d", os.path.join(workdir, "request.bin"),
            "-H", "content-type: application/grpc", "-H", "te: trailers",
            f"--log-file={logfile}", f"http://127.0.0.1:{port}{PATH}"]
    if args.rate:
        argv.insert(4, f"--rps={max(1, args.rate // args.clients)}")
    out = subprocess.run(argv, capture_output=True, timeout=seconds + 60, text=True).stdout
    res = {"raw": out.splitlines()[-12:]}
    for line in out.splitlines():
        words = line.replace(",", "").split()
        if line.startswith("requests:"):
            res["succeeded"] = int(words[words.index("succeeded") - 1])
            res["failed"] = int(words[words.index("failed") - 1])
            res["errored"] = int(words[words.index("errored") - 1])
        elif line.startswith("status codes:"):
            # "status codes: N 2xx, N 3xx, N 4xx, N 5xx"
            res["non_2xx"] = int(words[4]) + int(words[6]) + int(words[8])
        elif line.startswith("finished in"):
            res["rps"] = float(words[3])
    if "succeeded" not in res:
        raise BenchError(f"h2load printed no summary:\n{out}")
    latencies = []
    with open(logfile) as f:
        for line in f:
            cols = line.split("\t")
            if len(cols) >= 3:
                latencies.append(int(cols[2]))
    latencies.sort()
    pct = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] / 1000 if latencies else None
    res.update(p50_ms=pct(0.50), p99_ms=pct(0.99), max_ms=latencies[-1] / 1000 if latencies else None)
    os.remove(logfile)
    return res


def measure(t, args, workdir, tag):
    """One window: h2load against t, with t's CPU time and the other use of its core."""
    cpu0, before = cpu_times(), tree_ticks(t["proc"].pid)
    res = h2load(t["port"], args.duration, args, workdir, tag)
    after, cpu1 = tree_ticks(t["proc"].pid), cpu_times()
    used = (after - before) / CLK_TCK
    pc = args.proxy_cpu
    busy = cpu1[pc][0] - cpu0[pc][0]
    total = max(1, cpu1[pc][1] - cpu0[pc][1])
    res["cpu_us_per_req"] = used * 1e6 / res["succeeded"] if res["succeeded"] else None
    res["proxy_cpu_pct"] = 100.0 * (after - before) / total
    res["proxy_core_other_pct"] = max(0.0, 100.0 * (busy - (after - before)) / total)
    lc = args.load_cpu
    res["load_core_busy_pct"] = 100.0 * (cpu1[lc][0] - cpu0[lc][0]) / max(1, cpu1[lc][1] - cpu0[lc][1])
    return res


# ---------------------------------------------------------------------------- main

def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default="target/release/gatehouse")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=8, help="seconds per measured window")
    ap.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per proxy")
    ap.add_argument("--clients", type=int, default=16, help="h2load connections")
    ap.add_argument("--streams", type=int, default=8, help="h2load concurrent calls per connection")
    ap.add_argument("--rate", type=int, default=0, help="offered calls/s in total (0: closed loop)")
    ap.add_argument("--proxy-cpu", type=int, default=1)
    ap.add_argument("--load-cpu", type=int, default=0)
    ap.add_argument("--port-base", type=int, default=21900)
    ap.add_argument("--max-other", type=float, default=5.0,
                    help="%% of the proxy's core others may use before a window is measured again")
    ap.add_argument("--retries", type=int, default=2)
    ap.add_argument("--json", default=os.path.join(tempfile.gettempdir(), "gatehouse-grpc-bench.json"))
    ap.add_argument("--keep-workdir", action="store_true")
    for tool in ("nginx", "h2load", "nghttp"):
        ap.add_argument(f"--{tool}", default=tool)
    args = ap.parse_args(argv)

    args.nginx = shutil.which(args.nginx) or shutil.which(args.nginx, path="/usr/sbin:/sbin")
    for tool in ("nginx", "h2load", "nghttp"):
        if not getattr(args, tool) or not shutil.which(getattr(args, tool)):
            log(f"missing {tool}: run `bash benches/compare/install.sh nginx h2load taskset`")
            return 2
    if not shutil.which("taskset"):
        log("missing taskset (util-linux)")
        return 2
    binary = os.path.abspath(args.binary)
    if not os.access(binary, os.X_OK):
        log(f"no gatehouse binary at {binary}: cargo build --release")
        return 2
    if args.proxy_cpu == args.load_cpu or not {args.proxy_cpu, args.load_cpu} <= os.sched_getaffinity(0):
        log("need two distinct usable CPUs (--proxy-cpu, --load-cpu)")
        return 2
    ports = {"upstream": args.port_base, "gatehouse": args.port_base + 1, "nginx": args.port_base + 2}
    busy = [p for p in ports.values() if not port_free(p)]
    if busy:
        log(f"ports {busy} are in use: pick another --port-base")
        return 3
    os.sched_setaffinity(0, {args.load_cpu})  # the harness stays off the proxy's core

    workdir = tempfile.mkdtemp(prefix="gatehouse-grpc-bench.")
    os.chmod(workdir, 0o755)
    with open(os.path.join(workdir, "reply.bin"), "wb") as f:
        f.write(REPLY)
    with open(os.path.join(workdir, "request.bin"), "wb") as f:
        f.write(REQUEST)
    load_avg = os.getloadavg()
    result = {"meta": {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "loadavg_at_start": load_avg,
                       "args": {k: v for k, v in vars(args).items()}, "binary": binary},
              "rounds": {"gatehouse": [], "nginx": []}}
    try:
        version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.strip()
        result["meta"]["versions"] = {
            "gatehouse": version,
            "nginx": subprocess.run([args.nginx, "-v"], capture_output=True, text=True).stderr.strip(),
            "h2load": subprocess.run([args.h2load, "--version"], capture_output=True, text=True).stdout.split("\n")[0],
        }
        up = start("upstream", [args.nginx, "-p", workdir, "-c",
                                upstream_conf(workdir, ports["upstream"])], args.load_cpu, workdir)
        wait_listening(up, ports["upstream"], workdir)
        gh_conf = gatehouse_conf(workdir, ports["gatehouse"], ports["upstream"])
        checked = subprocess.run([binary, "check", "--config", gh_conf], capture_output=True, text=True)
        if checked.returncode != 0:
            raise BenchError(f"gatehouse check failed:\n{checked.stdout}{checked.stderr}")
        targets = [
            {"name": "gatehouse", "port": ports["gatehouse"],
             "proc": start("gatehouse", [binary, "run", "--config", gh_conf], args.proxy_cpu, workdir)},
            {"name": "nginx", "port": ports["nginx"],
             "proc": start("nginx", [args.nginx, "-p", workdir, "-c",
                                     nginx_conf(workdir, ports["nginx"], ports["upstream"])],
                           args.proxy_cpu, workdir)},
        ]
        for t in targets:
            wait_listening(t["proc"], t["port"], workdir)
            check(t["name"], t["port"], args, workdir)
            if args.warmup:
                h2load(t["port"], args.warmup, args, workdir, f"warmup-{t['name']}")
        for rnd in range(1, args.rounds + 1):
            for t in targets:
                tries = []
                for attempt in range(args.retries + 1):
                    r = measure(t, args, workdir, f"r{rnd}-{t['name']}-{attempt}")
                    tries.append(r)
                    if r["proxy_core_other_pct"] <= args.max_other:
                        break
                    again = attempt < args.retries
                    log(f"  r{rnd} {t['name']}: others used {r['proxy_core_other_pct']:.1f}% of the "
                        f"proxy's core" + ("; measuring again" if again else "; keeping the cleanest try"))
                r = min(tries, key=lambda x: x["proxy_core_other_pct"])
                r["attempts"] = len(tries)
                # h2load counts the status of a call cut off at the window's end but not the
                # call: so no non-2xx status, rather than as many 2xx as calls.
                bad = r["succeeded"] == 0 or r["failed"] or r["errored"] or r.get("non_2xx", 1)
                if bad:
                    raise BenchError(f"{t['name']} round {rnd}: failures: " + "\n".join(r["raw"]))
                result["rounds"][t["name"]].append(r)
                log(f"  r{rnd} {t['name']:9s} {r['rps']:9,.0f} calls/s  p50 {r['p50_ms']:.2f} ms  "
                    f"p99 {r['p99_ms']:.2f} ms  cpu/call {r['cpu_us_per_req']:.1f} µs  proxy cpu "
                    f"{r['proxy_cpu_pct']:.0f}%  others on its core {r['proxy_core_other_pct']:.1f}%")
        for t in targets:
            result.setdefault("peak_rss_kib", {})[t["name"]] = tree_hwm_kib(t["proc"].pid)
    except BenchError as e:
        log(f"FAILED: {e}")
        return 1
    finally:
        for p in list(reversed(STARTED)):
            stop(p)
        if args.keep_workdir:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    med = lambda name, key: statistics.median(r[key] for r in result["rounds"][name])
    ratio = lambda key: statistics.median(g[key] / n[key] for g, n in
                                          zip(result["rounds"]["gatehouse"], result["rounds"]["nginx"]))
    result["median"] = {n: {k: med(n, k) for k in ("rps", "cpu_us_per_req", "p50_ms", "p99_ms",
                                                    "proxy_cpu_pct", "proxy_core_other_pct")}
                        for n in ("gatehouse", "nginx")}
    result["ratio_gatehouse_to_nginx"] = {k: ratio(k) for k in ("cpu_us_per_req", "p50_ms", "p99_ms", "rps")}
    result["meta"]["loadavg_at_end"] = os.getloadavg()
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)

    mode = f"offered {args.rate} calls/s" if args.rate else f"closed loop, {args.clients}×{args.streams} streams"
    print(f"gRPC unary, {mode}, {args.rounds} rounds of {args.duration}s "
          f"(load average at start {load_avg[0]:.2f}, at end {result['meta']['loadavg_at_end'][0]:.2f})\n")
    print("| proxy | calls/s | CPU µs/call | p50 ms | p99 ms | proxy CPU % | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for n in ("nginx", "gatehouse"):
        m = result["median"][n]
        print(f"| {n} | {m['rps']:,.0f} | {m['cpu_us_per_req']:.1f} | {m['p50_ms']:.2f} | "
              f"{m['p99_ms']:.2f} | {m['proxy_cpu_pct']:.0f} | {result['peak_rss_kib'][n] / 1024:.1f} |")
    r = result["ratio_gatehouse_to_nginx"]
    print(f"\ngatehouse ÷ nginx (median of per-round ratios): CPU µs/call {r['cpu_us_per_req']:.2f}×, "
          f"p50 {r['p50_ms']:.2f}×, p99 {r['p99_ms']:.2f}×, calls/s {r['rps']:.2f}×")
    print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    def _stop(signum, frame):
        raise KeyboardInterrupt
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _stop)
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        for p in list(reversed(STARTED)):
            stop(p)
        sys.exit(130)
