#!/usr/bin/env bash
# gRPC unary calls: gatehouse (upstream.protocol = "h2c") vs nginx's grpc_pass, pinned
# cores, interleaved rounds, CPU µs/call and p99. See bench.py's docstring (--help).
#   bash benches/compare/install.sh nginx h2load taskset && cargo build --release && bash deploy/examples/grpc/bench.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec python3 "$here/bench.py" "$@"
