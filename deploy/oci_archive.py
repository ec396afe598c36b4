"""Write gatehouse's container image as an OCI image-layout tar archive, without a container
engine (deploy/build-image.sh runs this; see it for the arguments).

The archive is one OCI layout (`oci-layout`, `index.json`, `blobs/sha256/...`: what `skopeo`,
`podman load` and containerd's importer, which `kind load image-archive` and Docker's
containerd image store use, read) plus Docker's `manifest.json` over the same blobs (what
`docker load` reads with Docker's classic image store). The image's name is carried by all
three: `io.containerd.image.name` (containerd uses it verbatim, so it is the normalized
`docker.io/library/...` form the kubelet looks up), `org.opencontainers.image.ref.name` (podman
and skopeo) and `RepoTags` (Docker).

One layer, no base image: the static binary, a default config at the path `GATEHOUSE_CONFIG`
names, and /etc/passwd and /etc/group entries for the non-root user (so `ps`, `id` and
runtimes that resolve names see "nonroot"). No shell, no libc.

Reproducible: entries sorted, owners 0:0, every mtime and `created` set from one timestamp,
gzip without name or time, JSON with sorted keys. The same inputs give the same bytes (with
the same zlib).
"""

import argparse
import datetime
import gzip
import hashlib
import io
import json
import os
import sys
import tarfile

UID = GID = 65532
PROXY_PORT, ADMIN_PORT = 8080, 9901
BINARY = "usr/local/bin/gatehouse"
CONFIG = "etc/gatehouse/proxy.toml"


def canonical_json(value):
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tar_bytes(entries, mtime):
    """A tar of `entries` (path -> (mode, bytes), or (mode, None) for a directory), sorted,
    owned by 0:0, all with `mtime`."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(entries):
            mode, data = entries[path]
            info = tarfile.TarInfo(path)
            info.mode, info.mtime = mode, mtime
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def with_parents(files):
    """`files` plus a directory entry (0755) for each of their parents, as `docker export`
    and umoci write them, so that extractors never invent directories with other modes."""
    entries = dict(files)
    for path in files:
        parent = os.path.dirname(path)
        while parent:
            entries.setdefault(parent, (0o755, None))
            parent = os.path.dirname(parent)
    return entries


def rootfs(binary, config):
    passwd = f"root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:{UID}:{GID}:nonroot:/home/nonroot:/sbin/nologin\n"
    group = f"root:x:0:\nnonroot:x:{GID}:\n"
    return with_parents(
        {
            BINARY: (0o755, binary),
            CONFIG: (0o644, config),
            "etc/passwd": (0o644, passwd.encode()),
            "etc/group": (0o644, group.encode()),
            # An empty, world-writable /tmp for `docker run --read-only --tmpfs /tmp` and for
            # runtimes that want the mount point to exist.
            "tmp": (0o1777, None),
        }
    )


def build(args):
    with open(args.binary, "rb") as f:
        binary = f.read()
    with open(args.config, "rb") as f:
        config = f.read()
    created = args.created
    layer_tar = tar_bytes(rootfs(binary, config), args.mtime)
    gz = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=gz, mtime=0, compresslevel=6) as z:
        z.write(layer_tar)
    layer = gz.getvalue()

    labels = {
        "org.opencontainers.image.title": "gatehouse",
        "org.opencontainers.image.version": args.version,
        "org.opencontainers.image.description": args.description,
        "org.opencontainers.image.licenses": args.license,
        "org.opencontainers.image.created": created,
        # The documented defaults, readable with `docker inspect` / `skopeo inspect`.
        "io.gatehouse.config": "/" + CONFIG,
        "io.gatehouse.port.proxy": str(PROXY_PORT),
        "io.gatehouse.port.admin": str(ADMIN_PORT),
    }
    if args.source:
        labels["org.opencontainers.image.source"] = args.source
    if args.revision:
        labels["org.opencontainers.image.revision"] = args.revision
    image_config = {
        "architecture": "amd64",
        "os": "linux",
        "created": created,
        "config": {
            "User": f"{UID}:{GID}",
            "Env": [
                "PATH=/usr/local/bin",
                f"GATEHOUSE_CONFIG=/{CONFIG}",
            ],
            "Entrypoint": ["/" + BINARY],
            "Cmd": ["run"],
            "WorkingDir": "/",
            "ExposedPorts": {f"{PROXY_PORT}/tcp": {}, f"{ADMIN_PORT}/tcp": {}},
            "Labels": labels,
        },
        "rootfs": {"type": "layers", "diff_ids": [sha256(layer_tar)]},
        "history": [{"created": created, "created_by": "deploy/build-image.sh"}],
    }
    config_blob = canonical_json(image_config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha256(config_blob),
            "size": len(config_blob),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": sha256(layer),
                "size": len(layer),
            }
        ],
        "annotations": {
            k: v
            for k, v in labels.items()
            if k.startswith("org.opencontainers.image.")
        },
    }
    manifest_blob = canonical_json(manifest)
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": manifest["mediaType"],
                "digest": sha256(manifest_blob),
                "size": len(manifest_blob),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {
                    "io.containerd.image.name": args.name,
                    "org.opencontainers.image.ref.name": args.name,
                },
            }
        ],
    }
    blobs = {sha256(b).split(":")[1]: b for b in (layer, config_blob, manifest_blob)}
    docker_manifest = [
        {
            "Config": "blobs/sha256/" + sha256(config_blob).split(":")[1],
            "RepoTags": [args.docker_tag],
            "Layers": ["blobs/sha256/" + sha256(layer).split(":")[1]],
        }
    ]
    files = {
        "oci-layout": (0o644, canonical_json({"imageLayoutVersion": "1.0.0"})),
        "index.json": (0o644, canonical_json(index)),
        "manifest.json": (0o644, canonical_json(docker_manifest)),
        **{f"blobs/sha256/{hex_}": (0o644, data) for hex_, data in blobs.items()},
    }
    archive = tar_bytes(with_parents(files), args.mtime)
    tmp = args.output + ".tmp"
    with open(tmp, "wb") as f:
        f.write(archive)
    os.replace(tmp, args.output)
    print(f"manifest {sha256(manifest_blob)}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--binary", required=True)
    p.add_argument("--config", required=True, help="copied to /" + CONFIG)
    p.add_argument("--name", required=True, help="normalized reference, docker.io/library/NAME:TAG")
    p.add_argument("--docker-tag", required=True, help="Docker's RepoTags entry, NAME:TAG")
    p.add_argument("--version", required=True)
    p.add_argument("--description", required=True)
    p.add_argument("--license", required=True)
    p.add_argument("--source", default="")
    p.add_argument("--revision", default="")
    p.add_argument("--mtime", type=int, required=True, help="seconds since the epoch")
    p.add_argument("--output", required=True)
    args = p.parse_args()
    args.created = datetime.datetime.fromtimestamp(args.mtime, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    try:
        build(args)
    except OSError as e:
        sys.exit(f"oci_archive: {e.filename}: {e.strerror}")


if __name__ == "__main__":
    main()
