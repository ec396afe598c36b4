"""Check that a rendered pod's drain settings agree with its gatehouse proxy.toml.

    python deploy/check_drain.py target/k8s-rendered/overlays-example.yaml

For every Deployment running gatehouse with a proxy.toml from a ConfigMap in the same
rendering (so not for the fallback renderer, which generates no ConfigMap):
* the app containers' `preStop: sleep N` equals `shutdown_delay` (the app keeps serving
  while gatehouse does, before endpoints have caught up);
* `terminationGracePeriodSeconds` exceeds the worst case: the app's preStop + drain and then
  gatehouse's shutdown_delay + shutdown_grace (a native sidecar stops after the app), taking
  the app's drain as shutdown_grace; for a regular container the two run in parallel.
Exits 1 naming each disagreement. Durations use gatehouse's units (ms, s, m, h).
"""

import re
import sys
import tomllib
from collections.abc import Iterator

import yaml

UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


def seconds(text: str, where: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|m|h)", text)
    if not m:
        sys.exit(f"check_drain: {where}: cannot read duration {text!r} (${{VAR}} is not resolved here)")
    return int(m.group(1)) * UNITS[m.group(2)]


def gatehouse_pods(docs: list) -> Iterator[tuple]:
    """(name, pod spec, gatehouse container, parsed proxy.toml or None) for every Deployment
    in a rendering that runs gatehouse; None when its proxy.toml ConfigMap is not rendered."""
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    for dep in (d for d in docs if d["kind"] == "Deployment"):
        spec = dep["spec"]["template"]["spec"]
        containers = spec.get("initContainers", []) + spec.get("containers", [])
        gatehouse = next((c for c in containers if c["name"] == "gatehouse"), None)
        if gatehouse is None:
            continue
        mounts = {m["name"] for m in gatehouse.get("volumeMounts", [])}
        config = None
        for vol in spec.get("volumes", []):
            cm = vol.get("configMap", {}).get("name")
            if vol["name"] in mounts and cm in configmaps and "proxy.toml" in configmaps[cm]:
                config = tomllib.loads(configmaps[cm]["proxy.toml"])
        yield dep["metadata"]["name"], spec, gatehouse, config


def main(path: str) -> int:
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    problems = []
    for name, spec, gatehouse, config in gatehouse_pods(docs):
        init = spec.get("initContainers", [])
        main_containers = spec.get("containers", [])
        if config is None:
            print(f"check_drain: {path}: deployment/{name}: no rendered proxy.toml ConfigMap, skipped")
            continue
        server = config.get("server", {})
        delay = seconds(server.get("shutdown_delay", "0s"), "server.shutdown_delay")
        grace = seconds(server.get("shutdown_grace", "20s"), "server.shutdown_grace")
        native = gatehouse in init and gatehouse.get("restartPolicy") == "Always"
        apps = [c for c in main_containers if c is not gatehouse]
        for app in apps:
            cmd = app.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
            if len(cmd) == 2 and cmd[0] == "sleep" and float(cmd[1]) != delay:
                problems.append(
                    f"deployment/{name}: container {app['name']} preStop sleeps {cmd[1]}s, "
                    f"shutdown_delay is {delay:g}s"
                )
        app_stop = delay + grace
        needed = app_stop + (delay + grace if native else 0)
        period = spec.get("terminationGracePeriodSeconds", 30)
        if period <= needed:
            problems.append(
                f"deployment/{name}: terminationGracePeriodSeconds {period} must exceed {needed:g}s "
                f"(shutdown_delay {delay:g}s + shutdown_grace {grace:g}s"
                f"{' for the app, then again for gatehouse as a native sidecar' if native else ''})"
            )
        print(
            f"check_drain: deployment/{name}: shutdown_delay {delay:g}s + shutdown_grace {grace:g}s, "
            f"{'native sidecar' if native else 'regular container'}: worst case {needed:g}s, "
            f"terminationGracePeriodSeconds {period}"
        )
    for p in problems:
        print(f"check_drain: {path}: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
