"""Check that components/inject reached exactly the Deployments labelled for it.

    python deploy/check_inject.py target/k8s-rendered/overlays-example.yaml

In a rendering by kustomize (the fallback renderer applies no patches, so validate.sh does
not run this there), every Deployment labelled `gatehouse.io/inject: "true"` has one
container named gatehouse (a native sidecar in initContainers, or a regular container with
components/sidecar-pre-1.29) whose image carries a tag (the component's `images:` entry, or
an overlay's, was applied) and that mounts a volume backed by a ConfigMap rendered alongside;
every other Deployment has none. Exits 1 naming each disagreement.
"""

import sys

import yaml

LABEL = "gatehouse.io/inject"


def problems(docs: list) -> list:
    configmaps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    found = []
    for dep in (d for d in docs if d["kind"] == "Deployment"):
        name = f"deployment/{dep['metadata']['name']}"
        labelled = (dep["metadata"].get("labels") or {}).get(LABEL) == "true"
        spec = dep["spec"]["template"]["spec"]
        init = [c for c in spec.get("initContainers", []) if c["name"] == "gatehouse"]
        regular = [c for c in spec.get("containers", []) if c["name"] == "gatehouse"]
        sidecars = init + regular
        if not labelled:
            if sidecars:
                found.append(f"{name}: has a gatehouse container but no {LABEL}: \"true\" label")
            continue
        if len(sidecars) != 1:
            found.append(f"{name}: labelled {LABEL}, but has {len(sidecars)} gatehouse containers")
            continue
        (sidecar,) = sidecars
        if init and sidecar.get("restartPolicy") != "Always":
            found.append(f"{name}: gatehouse is an init container without restartPolicy: Always")
        image = sidecar.get("image", "")
        if ":" not in image.rsplit("/", 1)[-1] and "@" not in image:
            found.append(f"{name}: gatehouse image {image!r} has no tag (no images: entry applied)")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for mount in sidecar.get("volumeMounts", []):
            if mount["mountPath"] != "/etc/gatehouse":
                continue
            cm = volumes.get(mount["name"], {}).get("configMap", {}).get("name")
            if cm not in configmaps:
                found.append(f"{name}: /etc/gatehouse is ConfigMap {cm!r}, which is not rendered")
            break
        else:
            found.append(f"{name}: gatehouse mounts nothing at /etc/gatehouse")
    return found


def main() -> None:
    path = sys.argv[1]
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    found = problems(docs)
    for p in found:
        print(f"check_inject: {path}: {p}", file=sys.stderr)
    injected = sum(
        1 for d in docs
        if d["kind"] == "Deployment" and (d["metadata"].get("labels") or {}).get(LABEL) == "true"
    )
    if found:
        sys.exit(1)
    print(f"check_inject: {injected} Deployment(s) labelled {LABEL} have gatehouse, the others not")


if __name__ == "__main__":
    main()
