"""What the repository's benchmarks share: starting pinned processes, reading what they cost
from /proc, counting their syscalls, driving wrk and h2load, and summarising rounds.

Used by benches/compare/bench.py (gatehouse against nginx and haproxy) and by
deploy/examples/fastapi/bench.py (the sidecar's seat beside the FastAPI app). Stdlib only.

CPU time is counted in nanoseconds, not in clock ticks: utime+stime in /proc/PID/stat are
kept in ticks, so a proxy that wakes hundreds of times a second for tens of microseconds is
charged in 10 ms steps. Instead each process's CPU clock (clock_gettime on the clock id that
clock_getcpuclockid(pid) returns, the scheduler's sum_exec_runtime of every thread, exited
ones included) is read at both ends of a window, and every thread's share from
/proc/PID/task/TID/schedstat (its first field, the same counter per thread), so that work on
threads other than the request's shows, and the CPU of threads that exited in the window is
the difference.
"""

import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WRK_LUA = os.path.join(HERE, "wrk_report.lua")
SYSCALL_TOOLS = ("perf", "strace")
# The note of a run that counted syscalls with strace.
STRACE_NOTE = ("syscalls were counted with strace, which slows every syscall many times over: the CPU, latency "
               "and req/s of this run are not comparable with a run without it")


class BenchError(Exception):
    pass


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- processes

class Launcher:
    """Starts processes pinned to a CPU, each in its own process group, and stops them all
    (by their own group, never by name) when the run ends."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.started = []

    def start(self, name, argv, cpu, env=None, cwd=None, stdout_path=None):
        p_log = os.path.join(self.workdir, f"{name}.log")
        out = open(stdout_path or p_log, "ab")
        err = open(p_log, "ab") if stdout_path else subprocess.STDOUT
        try:
            p = subprocess.Popen(["taskset", "-c", str(cpu)] + argv, stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=err, env=dict(os.environ, **(env or {})), cwd=cwd or self.workdir,
                                 start_new_session=True)
        finally:
            out.close()
            if stdout_path:
                err.close()
        p.name = name
        p.log_path = p_log
        self.started.append(p)
        return p

    def stop(self, p, timeout=15.0):
        """SIGTERM p's process group (gatehouse flushes its audit queue then; nginx's master
        stops its worker), wait for the whole group to be gone, SIGKILL what is left."""
        try:
            os.killpg(p.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if p.poll() is not None:
                    os.killpg(p.pid, 0)  # raises once no member of the group is left
                time.sleep(0.05)
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            log(f"bench: {p.name} (pid {p.pid}) did not exit after SIGKILL")
        if p in self.started:
            self.started.remove(p)

    def stop_all(self):
        for p in reversed(list(self.started)):
            self.stop(p, timeout=5.0)


def tail(path, n=20):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def connector(where):
    """Connects to `where`: a port on 127.0.0.1, or a Unix socket's path."""
    def connect():
        if isinstance(where, int):
            return socket.create_connection(("127.0.0.1", where), timeout=1)
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(where)
        except OSError:
            s.close()
            raise
        return s
    return connect


def wait_until(p, connect, what, timeout=30.0):
    """Until `connect` succeeds; fails with the tail of p's log if p exits or time runs out."""
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


def render(template, values, dest):
    """A config template with its {{NAME}}s filled; every placeholder must be given."""
    with open(template) as f:
        text = f.read()
    for k, v in values.items():
        text = text.replace("{{" + k + "}}", str(v))
    left = sorted(set(re.findall(r"\{\{[A-Z_]+\}\}", text)))
    if left:
        raise BenchError(f"{template}: no value for {', '.join(left)}")
    with open(dest, "w") as f:
        f.write(text)
    return dest


# ----------------------------------------------------------------------------- /proc

def process_tree(roots):
    """The root pids and all their live descendants."""
    children = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(name))
    out, todo = [], list(roots)
    while todo:
        p = todo.pop()
        if p not in out:
            out.append(p)
            todo.extend(children.get(p, []))
    return out


def process_cpu_ns(pid):
    """CPU time of every thread of a process, exited threads included, in ns; None once gone.
    The clock id is what glibc's clock_getcpuclockid(pid) returns (CPUCLOCK_SCHED of the
    process), which Python does not wrap."""
    try:
        return time.clock_gettime_ns(((~pid) << 3) | 2)
    except OSError:
        return None


def tree_cpu_s(roots):
    return sum(process_cpu_ns(p) or 0 for p in process_tree(roots)) / 1e9


def thread_counters(pids):
    """{tid: (comm, CPU ns, context switches)} of every live thread of these processes."""
    out = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            base = f"/proc/{pid}/task/{tid}"
            try:
                with open(f"{base}/schedstat") as f:
                    ns = int(f.read().split()[0])
                with open(f"{base}/status") as f:
                    status = f.read()
            except (OSError, ValueError, IndexError):
                continue  # exited between listdir and read: the process clock still has its CPU
            comm = re.search(r"^Name:\s*(.*)$", status, re.M).group(1)
            switches = sum(int(n) for n in re.findall(r"^(?:non)?voluntary_ctxt_switches:\s*(\d+)", status, re.M))
            out[int(tid)] = (comm, ns, switches)
    return out


def tree_mem_kib(roots):
    """Sum of VmHWM over the processes (shared pages count once per process)."""
    hwm = 0
    for pid in process_tree(roots):
        try:
            with open(f"/proc/{pid}/status") as f:
                m = re.search(r"^VmHWM:\s*(\d+)", f.read(), re.M)
            hwm += int(m.group(1)) if m else 0
        except OSError:
            pass
    return hwm


def core_times():
    """{cpu: (busy, steal, total)} in ticks from /proc/stat (good enough for shares of a core)."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and not line.startswith("cpu "):
                parts = line.split()
                v = [int(x) for x in parts[1:9]]
                busy = v[0] + v[1] + v[2] + v[5] + v[6]  # user nice system irq softirq
                out[int(parts[0][3:])] = (busy, v[7], busy + v[3] + v[4] + v[7])  # + idle iowait steal
    return out


def all_proc_ticks():
    """{pid: (comm, utime+stime ticks)} of every process: who else used the machine."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    data = f.read().decode(errors="replace")
            except OSError:
                continue
            rest = data.rsplit(")", 1)[1].split()
            out[int(name)] = (data[data.find("(") + 1:data.rfind(")")], int(rest[11]) + int(rest[12]))
    return out


class Window:
    """What a set of processes (and their descendants) cost over one measured window.

        with Window([pid], syscalls="perf") as w:
            run_the_load()
        w.cpu_s, w.switches, w.syscalls, w.threads

    cpu_s is exact: the processes' CPU clocks, which keep the time of exited threads. Per-thread
    CPU and context switches come from /proc/PID/task, sampled every `interval` seconds from
    this (the harness's) CPU: the kernel keeps no context-switch count of a process's exited
    threads that /proc shows, so a thread that exits in the window keeps the switches it had at
    its last sample, and one that lives and dies between two samples is missed. `exited` lists
    the threads seen to exit; `exited_cpu_s` (cpu_s less the live threads' sum) is nonzero when
    any did, seen or not: then `switches` is a lower bound. A proxy's threads normally live as
    long as it does. `syscalls` ("perf" or "strace") also counts the processes' system calls;
    both tools slow the traced process (strace by far), so the CPU of such windows is not
    comparable with plain ones.
    """

    def __init__(self, roots, syscalls=None, workdir=None, interval=0.1):
        self.roots = roots
        self.tool = syscalls
        self.workdir = workdir
        self.interval = interval
        self.syscalls = None

    def __enter__(self):
        self.pids = process_tree(self.roots)
        self.counter = SyscallCounter(self.tool, self.pids, self.workdir) if self.tool else None
        self.cpu0 = {p: process_cpu_ns(p) for p in self.pids}
        self.first = thread_counters(self.pids)
        self.last = dict(self.first)
        self.done = threading.Event()
        self.sampler = threading.Thread(target=self._sample, daemon=True)
        self.sampler.start()
        return self

    def _sample(self):
        while not self.done.wait(self.interval):
            self.last.update(thread_counters(self.pids))

    def __exit__(self, *exc):
        self.done.set()
        self.sampler.join()
        if self.counter:
            self.syscalls = self.counter.stop()
        live = thread_counters(self.pids)
        self.last.update(live)
        cpu1 = {p: process_cpu_ns(p) for p in self.pids}
        self.gone = [p for p in self.pids if cpu1[p] is None]
        self.cpu_s = sum(cpu1[p] - self.cpu0[p] for p in self.pids if cpu1[p] is not None) / 1e9
        # {tid: (comm, CPU s, switches)} in the window; a thread born in it started from 0
        self.threads = {}
        for tid, (comm, ns, sw) in self.last.items():
            _, ns0, sw0 = self.first.get(tid, (comm, 0, 0))
            self.threads[tid] = (comm, (ns - ns0) / 1e9, sw - sw0)
        self.switches = sum(sw for _, _, sw in self.threads.values())
        self.exited = [tid for tid in self.last if tid not in live]
        self.exited_cpu_s = max(0.0, self.cpu_s - sum(s for tid, (_, s, _) in self.threads.items() if tid in live))
        return False

    @property
    def churn(self):
        """Did threads exit in the window (so that `switches` is a lower bound)? The 1 ms is
        the slack between reading the clocks and the threads' counters."""
        return bool(self.exited) or self.exited_cpu_s > 0.001

    def busiest(self, wall):
        """[(comm, % of a core)] of the threads, busiest first."""
        return sorted(((comm, 100 * s / wall) for comm, s, _ in self.threads.values()), key=lambda x: -x[1])


class SyscallCounter:
    """Counts the system calls of processes (all their threads, and threads they start) from
    now until stop(): `perf stat -e raw_syscalls:sys_enter` or `strace -c -f`."""

    def __init__(self, tool, pids, workdir):
        self.tool = tool
        self.out = os.path.join(workdir, f"syscalls-{os.getpid()}-{time.monotonic_ns()}.txt")
        if tool == "perf":
            argv = ["perf", "stat", "-x,", "-e", "raw_syscalls:sys_enter", "-p", ",".join(map(str, pids)),
                    "-o", self.out]
        elif tool == "strace":
            argv = ["strace", "-c", "-f", "-q", "-o", self.out] + [a for p in pids for a in ("-p", str(p))]
        else:
            raise BenchError(f"syscall counter {tool!r}: use one of {', '.join(SYSCALL_TOOLS)}")
        self.p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  start_new_session=True)
        time.sleep(0.3)  # attached before the load starts: it counts the idle edges too, which are ~0
        if self.p.poll() is not None:
            raise BenchError(f"{tool} exited with {self.p.returncode} when attaching: "
                             f"{self.p.stderr.read().decode(errors='replace')[-500:]}")

    def stop(self):
        self.p.send_signal(signal.SIGINT)
        try:
            _, err = self.p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait()
            raise BenchError(f"{self.tool} did not stop within 30 s of SIGINT")
        try:
            with open(self.out) as f:
                text = f.read()
            os.remove(self.out)
        except OSError:
            text = ""
        if self.tool == "perf":
            m = re.search(r"^([\d.]+),[^,]*,raw_syscalls:sys_enter", text, re.M)
        else:  # the summary's last line: "100.00 seconds usecs/call calls [errors] total"
            m = re.search(r"^\s*100\.00\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?total\s*$", text, re.M)
        if not m:
            raise BenchError(f"{self.tool} counted no syscalls (is the tracepoint there? root?):\n"
                             f"{text[-800:]}{err.decode(errors='replace')[-500:]}")
        return int(float(m.group(1)))


# ----------------------------------------------------------------------------- load generators

def run_loadgen(argv, seconds):
    try:
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{argv[3]} did not finish within {seconds + 60} s: the target stalled")
    return p.returncode, p.stdout, p.stderr


def wrk(url, seconds, connections, cpu, headers=(), threads=1, wrk_bin="wrk"):
    """Closed loop: `connections` keep-alive connections, each sending its next request as
    soon as the last one's answer is in. Errors are socket errors plus statuses > 399."""
    argv = ["taskset", "-c", str(cpu), wrk_bin, f"-t{threads}", f"-c{connections}", f"-d{seconds}s",
            "--timeout", "10s", "-s", WRK_LUA]
    for h in headers:
        argv += ["-H", h]
    rc, out, err = run_loadgen(argv + [url], seconds)
    m = re.search(r"^BENCHJSON (\{.*\})$", out, re.M)
    if rc != 0 or not m:
        raise BenchError(f"wrk against {url} failed (exit {rc}):\n{out}{err}")
    r = json.loads(m.group(1))
    return {"requests": r["requests"], "seconds": r["duration_us"] / 1e6,
            "non2xx": r["err_status"], "socket_errors": r["err_connect"] + r["err_read"] + r["err_write"]
            + r["err_timeout"], "p50_ms": r["p50_us"] / 1000, "p99_ms": r["p99_us"] / 1000,
            "max_ms": r["max_us"] / 1000}


def h2load(url, rate, seconds, connections, cpu, log_file, headers=(), h2load_bin="h2load"):
    """A fixed offered rate (open loop), evenly spread. Each h2load connection sends --rps
    requests a second on its own timer, started when it connects: with -D all connect at once
    and their requests arrive in bursts of `connections`. Connecting them one by one (-r,
    --rate-period in whole ms; -n instead of -D, which -r excludes) spreads the timers over
    one interval. Latencies are percentiles of its per-request log."""
    gap_ms = 1000 / rate  # between two requests, and so between two connections' starts
    per_period, period_ms = (1, round(gap_ms)) if gap_ms >= 1 else (round(rate / 1000), 1)
    argv = ["taskset", "-c", str(cpu), h2load_bin, "--h1", "-t1", "-c", str(connections),
            f"--rps={rate / connections:.3f}", "-n", str(round(rate * seconds)), "-r", str(per_period),
            f"--rate-period={period_ms}ms", f"--log-file={log_file}"]
    for h in headers:
        argv += ["-H", h]
    rc, out, err = run_loadgen(argv + [url], seconds)
    fin = re.search(r"finished in ([\d.]+)(m?s)", out)
    done = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, \d+ succeeded, \d+ failed, "
                     r"(\d+) errored, (\d+) timeout", out)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if rc != 0 or not (fin and done and codes):
        raise BenchError(f"h2load against {url} failed (exit {rc}):\n{out}{err}")
    try:
        with open(log_file) as f:  # one row per request: start (µs), status, latency (µs)
            lat = sorted(int(row.split("\t")[2]) for row in f if row.count("\t") >= 2)
        os.remove(log_file)
    except OSError:
        lat = []
    if not lat:
        raise BenchError(f"h2load against {url}: empty per-request log")

    def pct(q):
        return lat[min(len(lat) - 1, int(len(lat) * q / 100))] / 1000

    answered = sum(int(x) for x in codes.groups())
    return {"requests": answered, "seconds": float(fin.group(1)) / (1000 if fin.group(2) == "ms" else 1),
            "non2xx": answered - int(codes.group(1)),
            # requests never done, plus those that ended in a socket error or a timeout
            "socket_errors": int(done.group(1)) - int(done.group(2)) + int(done.group(3)) + int(done.group(4)),
            "p50_ms": pct(50), "p99_ms": pct(99), "max_ms": lat[-1] / 1000}


# ----------------------------------------------------------------------------- summaries

def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def paired_ratio(rounds, ref_rounds, key):
    """Median over rounds of a / b for the same round (adjacent in time, so drift cancels)."""
    return med([a[key] / b[key] for a, b in zip(rounds, ref_rounds) if a.get(key) and b.get(key)])


def fmt(v, digits=0):
    return "—" if v is None else f"{v:,.{digits}f}"


def fmt_ratio(v):
    return "—" if v is None else f"{v:.2f}×"


def cell(rounds, key, digits=0):
    """Median of the rounds, with (min–max) when there are several."""
    values = [r[key] for r in rounds if r.get(key) is not None]
    if len(values) < 2:
        return fmt(values[0] if values else None, digits)
    return f"{fmt(med(values), digits)} ({fmt(min(values), digits)}–{fmt(max(values), digits)})"


def markdown(head, rows):
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
