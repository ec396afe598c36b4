"""The example's gRPC app: plain grpcio, with no auth, rate limiting or audit of its own;
gatehouse in front of it does those (proxy.toml). The stubs come from demo.proto at start
(grpc.protos_and_services, which needs grpcio-tools), so there is no generated code to keep.

Environment: LISTEN (default 127.0.0.1:50051; "unix:/path" for a Unix socket),
MAX_CONCURRENT_STREAMS (the HTTP/2 setting; default: grpcio's, no limit).
"""

import os
import sys
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
protos, services = grpc.protos_and_services("demo.proto")

MAX_MESSAGE = 64 << 20
# Metadata the Echo answer reports, as gatehouse forwards it.
SEEN = ("x-request-id", "x-forwarded-for", "x-forwarded-proto", "x-api-key", "authorization")


class Demo(services.DemoServicer):
    def Echo(self, request, context):
        if request.text.startswith("fail:"):
            # "fail:CODE:message": the app's own error status, in its trailers.
            _, code, message = request.text.split(":", 2)
            context.abort(grpc.StatusCode[code], message)
        if request.sleep_ms:
            time.sleep(request.sleep_ms / 1000)
        seen = {k: v for k, v in context.invocation_metadata() if k in SEEN}
        seen["peer"] = context.peer()
        return protos.Message(text=request.text, payload=request.payload, seen=seen)

    def Count(self, request, context):
        payload = b"x" * request.size
        for i in range(request.count):
            yield protos.Message(text=str(i), payload=payload)

    def Collect(self, request_iterator, context):
        messages = size = 0
        for message in request_iterator:
            messages += 1
            size += len(message.payload)
        return protos.Summary(messages=messages, bytes=size)

    def Chat(self, request_iterator, context):
        for message in request_iterator:
            yield protos.Message(text=message.text, payload=message.payload)


def main():
    listen = os.environ.get("LISTEN", "127.0.0.1:50051")
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
    ]
    if os.environ.get("MAX_CONCURRENT_STREAMS"):
        options.append(("grpc.max_concurrent_streams", int(os.environ["MAX_CONCURRENT_STREAMS"])))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), options=options)
    services.add_DemoServicer_to_server(Demo(), server)
    checks = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    for name in ("", "demo.v1.Demo"):
        checks.set(name, health_pb2.HealthCheckResponse.SERVING)
    server.add_insecure_port(listen)
    server.start()
    print(f"demo gRPC app listening on {listen}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
