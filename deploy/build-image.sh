#!/usr/bin/env bash
# Assemble gatehouse's container image as an OCI archive from the static musl binary, without
# a container engine or network:
#
#   bash deploy/build-static.sh      # the binary (once per source change)
#   bash deploy/build-image.sh       # -> target/gatehouse-image.tar, image gatehouse:VERSION
#
# The image: the binary at /usr/local/bin/gatehouse, deploy/kubernetes/base/proxy.toml at
# /etc/gatehouse/proxy.toml (GATEHOUSE_CONFIG; a ConfigMap mounted there replaces it), user
# 65532:65532, ports 8080 (proxy) and 9901 (admin), entrypoint `gatehouse run`; no shell.
# The archive loads with `docker load -i`, `podman load -i` and `kind load image-archive`
# as gatehouse:VERSION (docker.io/library/gatehouse:VERSION), VERSION being Cargo.toml's;
# `skopeo copy oci-archive:target/gatehouse-image.tar docker://REGISTRY/gatehouse:TAG`
# pushes it. deploy/oci_archive.py writes it (reproducibly: the timestamps are
# SOURCE_DATE_EPOCH's, or the last commit's).
#
# Environment: GATEHOUSE_BIN (default: the build-static.sh binary), GATEHOUSE_IMAGE (the
# archive's path), GATEHOUSE_SOURCE_URL (the org.opencontainers.image.source label; default:
# Cargo.toml's `repository`, else the git remote `origin`), SOURCE_DATE_EPOCH.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN="${GATEHOUSE_BIN:-target/x86_64-unknown-linux-musl/release/gatehouse}"
OUT="${GATEHOUSE_IMAGE:-target/gatehouse-image.tar}"
CONFIG=deploy/kubernetes/base/proxy.toml

# The first `key = "value"` of Cargo.toml's [package] table.
package_field() {
    sed -n '/^\[package\]/,/^\[/{s/^'"$1"' *= *"\(.*\)"$/\1/p}' Cargo.toml | head -n 1
}
version="$(package_field version)"
description="$(package_field description)"
license="$(package_field license)"
if [ -z "$version" ]; then
    echo "build-image: no version in Cargo.toml's [package]" >&2
    exit 1
fi

if [ ! -x "$BIN" ]; then
    echo "build-image: $BIN does not exist; build it first: bash deploy/build-static.sh" >&2
    exit 1
fi
# A binary left from another version would be shipped under the wrong tag.
reported="$("$BIN" --version)"
if [ "$reported" != "gatehouse $version" ]; then
    echo "build-image: $BIN says '$reported' but Cargo.toml is at $version;" \
        "rebuild it: bash deploy/build-static.sh" >&2
    exit 1
fi
case "$(file -L "$BIN" 2>/dev/null || echo static)" in
    *"dynamically linked"*)
        echo "build-image: $BIN is dynamically linked; the image has no libc (use build-static.sh)" >&2
        exit 1
        ;;
esac

source_url="${GATEHOUSE_SOURCE_URL:-$(package_field repository)}"
if [ -z "$source_url" ]; then
    # Without user:password@ – a credential in a remote URL must not end up in a label.
    source_url="$(git config --get remote.origin.url 2>/dev/null | sed -E 's#^(https?://)[^/@]*@#\1#' || true)"
fi
if [ -z "$source_url" ]; then
    echo "build-image: warning: no source URL (set GATEHOUSE_SOURCE_URL, or repository in" \
        "Cargo.toml); the image has no org.opencontainers.image.source label" >&2
fi
# The commit, when the tree matches it (a dirty tree's image is not that commit's).
revision=""
if git rev-parse --verify -q HEAD >/dev/null 2>&1 && git diff --quiet HEAD 2>/dev/null; then
    revision="$(git rev-parse HEAD)"
fi
mtime="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}"

mkdir -p "$(dirname "$OUT")"
python3 deploy/oci_archive.py \
    --binary "$BIN" --config "$CONFIG" \
    --name "docker.io/library/gatehouse:$version" --docker-tag "gatehouse:$version" \
    --version "$version" --description "$description" --license "$license" \
    --source "$source_url" --revision "$revision" --mtime "$mtime" \
    --output "$OUT"
echo "build-image: $OUT ($(du -h "$OUT" | cut -f1)): gatehouse:$version"
