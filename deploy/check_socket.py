"""Check that a gatehouse whose upstream is a Unix socket shares that socket with its app.

    python deploy/check_socket.py target/k8s-rendered/overlays-example-unix-socket.yaml

For every Deployment running gatehouse whose rendered proxy.toml has `upstream.url` =
`unix:PATH` (after `${VAR}` / `${VAR:-default}` from gatehouse's `env` values):
* PATH is on a volume gatehouse mounts, and that volume is an `emptyDir` (the pod's own);
* another container mounts the same volume and is given the socket's path as it sees it
  (in its command, args or env), so the app creates the socket where gatehouse looks.
A TCP upstream is not checked. Exits 1 naming each problem.
"""

import re
import sys

import yaml

from check_drain import gatehouse_pods

VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def resolve(text: str, env: dict) -> str:
    def one(m):
        if m.group(1) in env:
            return env[m.group(1)]
        if m.group(2) is None:
            raise KeyError(m.group(1))
        return m.group(2)

    return VAR.sub(one, text.replace("$${", "\0")).replace("\0", "${")


def mount_of(container: dict, path: str):
    """The volumeMount holding `path` (the deepest one), or None."""
    mounts = [m for m in container.get("volumeMounts", [])
              if path.startswith(m["mountPath"].rstrip("/") + "/")]
    return max(mounts, key=lambda m: len(m["mountPath"]), default=None)


def mentions(container: dict, text: str) -> bool:
    words = container.get("command", []) + container.get("args", [])
    words += [e.get("value", "") for e in container.get("env", [])]
    return any(text in str(w) for w in words)


def main(path: str) -> int:
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    problems = []
    for name, spec, gatehouse, config in gatehouse_pods(docs):
        if config is None:
            continue  # check_drain.py says so
        env = {e["name"]: e["value"] for e in gatehouse.get("env", []) if "value" in e}
        try:
            url = resolve(config.get("upstream", {}).get("url", ""), env)
        except KeyError as e:
            problems.append(f"deployment/{name}: upstream.url uses ${{{e.args[0]}}}, which gatehouse's env "
                            f"does not set")
            continue
        if not url.startswith("unix:"):
            continue
        sock = url.removeprefix("unix:")
        mount = mount_of(gatehouse, sock)
        if mount is None:
            problems.append(f"deployment/{name}: upstream {url}: gatehouse mounts no volume holding {sock}")
            continue
        volume = next((v for v in spec.get("volumes", []) if v["name"] == mount["name"]), {})
        if "emptyDir" not in volume:
            problems.append(f"deployment/{name}: the socket's volume {mount['name']} is not an emptyDir")
            continue
        rest = sock[len(mount["mountPath"].rstrip("/")):]
        peers = []
        for c in spec.get("initContainers", []) + spec.get("containers", []):
            theirs = next((m for m in c.get("volumeMounts", []) if c is not gatehouse
                           and m["name"] == mount["name"] and m.get("subPath") == mount.get("subPath")), None)
            if theirs:
                peers.append((c, theirs["mountPath"].rstrip("/") + rest))
        told = [c["name"] for c, where in peers if mentions(c, where)]
        if not told:
            problems.append(
                f"deployment/{name}: upstream {url}: no other container mounts volume {mount['name']} and is "
                f"given the socket's path there (looked for {sorted({w for _, w in peers}) or 'a mount'} in "
                f"command, args and env)")
            continue
        print(f"check_socket: deployment/{name}: gatehouse -> {url} on emptyDir {mount['name']}, "
              f"served by {', '.join(told)}")
    for p in problems:
        print(f"check_socket: {path}: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
