#!/usr/bin/env bash
# Render every kustomization under deploy/kubernetes and validate each resource offline
# against the Kubernetes API schemas (kubernetes-validate, pinned), then check that each
# pod's preStop and terminationGracePeriodSeconds agree with its proxy.toml's
# shutdown_delay/shutdown_grace (check_drain.py), and that a Unix-socket upstream is on a
# volume the app shares (check_socket.py), and that components/inject gave gatehouse to
# exactly the Deployments labelled gatehouse.io/inject: "true" (check_inject.py). Fails on
# any error.
#
#   bash deploy/validate.sh
#
# Rendering uses `kubectl kustomize` (or a standalone `kustomize`). Without either, a small
# Python fallback concatenates the YAML files each kustomization lists under `resources`
# and `components` (recursively, the components' own `resources` included) as they are: it
# applies no patches, images, namespaces, replicas, name prefixes or hash suffixes and
# renders no configMapGenerator/secretGenerator, so it checks the hand-written resources
# only, and the drain and injection checks are skipped (no rendered proxy.toml, no sidecar).
# It says when it is used.
set -euo pipefail
cd "$(dirname "$0")/.."

# The oldest Kubernetes the manifests support (native sidecars): validate against its schemas.
K8S_VERSION="${K8S_VERSION:-1.29.0}"
KV_VERSION=1.37.0
VENV="${CI_VENV:-target/ci-venv}"

installed="$("$VENV/bin/pip" show kubernetes-validate 2>/dev/null || true)"
if [ ! -x "$VENV/bin/kubernetes-validate" ] || ! grep -qx "Version: $KV_VERSION" <<<"$installed"; then
    echo "validate: installing kubernetes-validate==$KV_VERSION into $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$KV_VERSION"
fi

status=0

have_kustomize() {
    command -v kubectl >/dev/null 2>&1 || command -v kustomize >/dev/null 2>&1
}

render() {
    local dir="$1"
    if command -v kubectl >/dev/null 2>&1; then
        kubectl kustomize "$dir"
    elif command -v kustomize >/dev/null 2>&1; then
        kustomize build "$dir"
    else
        "$VENV/bin/python" - "$dir" <<'PY'
import os, sys, yaml

def resources(d):
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        path = os.path.join(d, name)
        if os.path.exists(path):
            break
    else:
        sys.exit(f"validate: no kustomization file in {d}")
    with open(path) as f:
        k = yaml.safe_load(f) or {}
    for entry in k.get("resources", []) + k.get("components", []):
        p = os.path.normpath(os.path.join(d, entry))
        if os.path.isdir(p):
            yield from resources(p)
        else:
            with open(p) as f:
                yield from (doc for doc in yaml.safe_load_all(f) if doc)

docs = list(resources(sys.argv[1]))
print(yaml.safe_dump_all(docs, sort_keys=False), end="")
PY
    fi
}

if ! have_kustomize; then
    echo "validate: no kubectl/kustomize: rendering by concatenating resources (no patches," \
        "components or generators applied; the injection check is skipped)" >&2
fi

# components/redis/proxy.toml is base/proxy.toml with the rate limit on Redis: a change to one
# must be made to the other, so any difference beyond the backend lines and comments fails.
drift="$(diff deploy/kubernetes/base/proxy.toml deploy/kubernetes/components/redis/proxy.toml \
    | grep '^[<>]' | grep -vE '^[<>] *(#.*)?$|^[<>] (backend|redis_url|on_backend_error) =' || true)"
if [ -n "$drift" ]; then
    echo "validate: components/redis/proxy.toml differs from base/proxy.toml beyond the rate" \
        "limit backend:" >&2
    echo "$drift" >&2
    status=1
fi

out="target/k8s-rendered"
mkdir -p "$out"
for kfile in $(find deploy/kubernetes -name kustomization.yaml | sort); do
    dir="$(dirname "$kfile")"
    # Components are only meaningful inside a kustomization; they are validated through it.
    if grep -q '^kind: Component' "$kfile"; then
        continue
    fi
    name="$(echo "${dir#deploy/kubernetes/}" | tr '/' '-')"
    rendered="$out/$name.yaml"
    render "$dir" >"$rendered"
    count="$(grep -c '^kind:' "$rendered" || true)"
    if [ "$count" -eq 0 ]; then
        echo "validate: $dir rendered no resources" >&2
        status=1
        continue
    fi
    echo "validate: $dir ($count resources, Kubernetes $K8S_VERSION schemas)"
    # --strict: unknown fields are errors, like gatehouse's own config.
    if ! "$VENV/bin/kubernetes-validate" --strict --kubernetes-version "$K8S_VERSION" "$rendered"; then
        status=1
    fi
    # The pod's drain settings must agree with its proxy.toml (see check_drain.py).
    if ! "$VENV/bin/python" deploy/check_drain.py "$rendered"; then
        status=1
    fi
    # An upstream on a Unix socket must be on a volume the app mounts and listens on.
    if ! "$VENV/bin/python" deploy/check_socket.py "$rendered"; then
        status=1
    fi
    # components/inject's label-selected patch reached the labelled Deployments, only them.
    if have_kustomize && ! "$VENV/bin/python" deploy/check_inject.py "$rendered"; then
        status=1
    fi
done
exit $status
