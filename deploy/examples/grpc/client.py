"""A gRPC client for the example (and its tests): makes one call and prints its outcome as
one JSON line, {"ok": true, "result": ...} or {"ok": false, "code": "UNAUTHENTICATED",
"code_value": 16, "details": "..."}, with the call's initial and trailing metadata.

  python client.py [--target HOST:PORT] [--tls-ca PEM] [--api-key KEY] [--bearer TOKEN]
                   [--timeout SECONDS] CALL [ARG...]

  echo TEXT [SLEEP_MS]    unary
  count N SIZE            server streaming: N messages of SIZE bytes
  collect N SIZE          client streaming: N messages of SIZE bytes
  chat N SIZE             bidirectional, in lock step: each message is sent only once the
                          previous one came back, so it needs both directions open at once
  parallel N SLEEP_MS     N unary calls at once; the app's peers (gatehouse's connections)
  health [SERVICE]        grpc.health.v1.Health/Check
"""

import argparse
import json
import os
import queue
import sys
from concurrent import futures

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
protos, services = grpc.protos_and_services("demo.proto")

MAX_MESSAGE = 64 << 20


def pairs(metadata):
    return [[k, v if isinstance(v, str) else v.hex()] for k, v in (metadata or ())]


def messages(n, size):
    payload = b"y" * size
    for i in range(n):
        yield protos.Message(text=str(i), payload=payload)


def call(stub, health_stub, args, kwargs):
    """Runs the call; returns (result, call object or None)."""
    name, rest = args.call, args.args
    if name == "echo":
        request = protos.Message(text=rest[0], sleep_ms=int(rest[1]) if len(rest) > 1 else 0)
        reply, c = stub.Echo.with_call(request, **kwargs)
        return {"text": reply.text, "seen": dict(reply.seen)}, c
    if name == "count":
        stream = stub.Count(protos.CountRequest(count=int(rest[0]), size=int(rest[1])), **kwargs)
        sizes = [len(m.payload) for m in stream]
        return {"messages": len(sizes), "bytes": sum(sizes)}, stream
    if name == "collect":
        summary, c = stub.Collect.with_call(messages(int(rest[0]), int(rest[1])), **kwargs)
        return {"messages": summary.messages, "bytes": summary.bytes}, c
    if name == "chat":
        n, size = int(rest[0]), int(rest[1])
        turn = queue.Queue()

        def lock_step():
            for i, message in enumerate(messages(n, size)):
                yield message
                if turn.get() != str(i):  # the reply to this message, before the next
                    return

        stream = stub.Chat(lock_step(), **kwargs)
        sizes = []
        for reply in stream:
            sizes.append(len(reply.payload))
            turn.put(reply.text)
        return {"messages": len(sizes), "bytes": sum(sizes)}, stream
    if name == "parallel":
        n, sleep_ms = int(rest[0]), int(rest[1])
        with futures.ThreadPoolExecutor(n) as pool:
            replies = list(pool.map(
                lambda i: stub.Echo(protos.Message(text=str(i), sleep_ms=sleep_ms), **kwargs),
                range(n)))
        return {"peers": sorted({r.seen["peer"] for r in replies})}, None
    if name == "health":
        request = health_pb2.HealthCheckRequest(service=rest[0] if rest else "")
        reply, c = health_stub.Check.with_call(request, **kwargs)
        return {"status": health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}, c
    raise SystemExit(f"unknown call {name!r}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="127.0.0.1:8080")
    parser.add_argument("--tls-ca", help="PEM of the CA to trust: TLS (ALPN h2) to gatehouse")
    parser.add_argument("--api-key", help="sent as x-api-key metadata")
    parser.add_argument("--bearer", help="sent as authorization: Bearer metadata")
    parser.add_argument("--timeout", type=float, help="the call's deadline, in seconds")
    parser.add_argument("call")
    parser.add_argument("args", nargs="*")
    args = parser.parse_args()

    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
    ]
    if args.tls_ca:
        with open(args.tls_ca, "rb") as f:
            credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        options.append(("grpc.ssl_target_name_override", "localhost"))
        channel = grpc.secure_channel(args.target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(args.target, options=options)
    metadata = []
    if args.api_key:
        metadata.append(("x-api-key", args.api_key))
    if args.bearer:
        metadata.append(("authorization", f"Bearer {args.bearer}"))
    kwargs = {"metadata": metadata, "timeout": args.timeout}

    with channel:
        stub = services.DemoStub(channel)
        health_stub = health_pb2_grpc.HealthStub(channel)
        try:
            result, c = call(stub, health_stub, args, kwargs)
            out = {"ok": True, "result": result}
            if c is not None:
                out["initial_metadata"] = pairs(c.initial_metadata())
                out["trailing_metadata"] = pairs(c.trailing_metadata())
        except grpc.RpcError as e:
            out = {
                "ok": False,
                "code": e.code().name,
                "code_value": e.code().value[0],
                "details": e.details(),
                "initial_metadata": pairs(e.initial_metadata()),
                "trailing_metadata": pairs(e.trailing_metadata()),
            }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
