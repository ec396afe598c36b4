#!/usr/bin/env bash
# The Quick start: a demo app (Python's static file server, serving docs/demo/site and
# nothing else, on 127.0.0.1:8000) with gatehouse in front of it on 127.0.0.1:8080, using
# the repository's proxy.toml. Ctrl-C (or SIGTERM) stops both.
#
# gatehouse is taken from $GATEHOUSE, else from PATH (cargo install --path .), else built
# with cargo build --release. DEMO_PORT and GATEHOUSE_LISTEN move the ports;
# GATEHOUSE_ADMIN the admin listener (default 127.0.0.1:9901).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
demo_port="${DEMO_PORT:-8000}"
export GATEHOUSE_LISTEN="${GATEHOUSE_LISTEN:-127.0.0.1:8080}"
export APP_URL="http://127.0.0.1:$demo_port"

gatehouse="${GATEHOUSE:-$(command -v gatehouse || true)}"
if [ -z "$gatehouse" ]; then
    echo "demo: no gatehouse on PATH; building it (cargo build --release)" >&2
    (cd "$root" && cargo build --release --quiet)
    gatehouse="$root/target/release/gatehouse"
fi

python3 -m http.server "$demo_port" --bind 127.0.0.1 --directory "$root/docs/demo/site" \
    >/dev/null 2>&1 &
app=$!
trap 'kill "$app" 2>/dev/null; wait "$app" 2>/dev/null || true' EXIT
echo "demo: app on 127.0.0.1:$demo_port (serving docs/demo/site), gatehouse on $GATEHOUSE_LISTEN" >&2
echo "demo: try  curl -i http://$GATEHOUSE_LISTEN/  (Ctrl-C stops both)" >&2
# Not exec: the trap must outlive gatehouse to stop the app. gatehouse drains on the signal
# the terminal sends it too.
"$gatehouse" run --config "$root/proxy.toml" &
gh=$!
trap 'kill -TERM "$gh" 2>/dev/null || true' INT TERM
wait "$gh" || true
wait "$gh" 2>/dev/null || true
