"""The example API *before* the migration: the same routes (imported from ../app.py) plus
the cross-cutting code every service used to carry in Python middleware:

* a request id (kept from the client if well-formed, else a new UUID), passed to the routes
  and returned,
* `x-response-time` and `server-timing` timing headers,
* an API-key check answering 401,
* a per-key rate limit (GCRA, in memory) answering 429, with `ratelimit-*` headers,
* an audit log line per request, written by a background task.

gatehouse now does all of it in front of the app, with the same settings (../proxy.toml);
../README.md walks through it side by side, and bench.sh measures both.

    API_KEY=secret AUDIT_FILE=audit.jsonl uvicorn app:app --app-dir before --port 8000
"""

import asyncio
import hmac
import importlib.util
import json
import math
import os
import re
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from fastapi import Request
from fastapi.responses import JSONResponse

# The routes are unchanged by the migration: load ../app.py (also a module named "app").
_spec = importlib.util.spec_from_file_location(
    "example_routes", Path(__file__).resolve().parent.parent / "app.py"
)
_routes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_routes)
app = _routes.app

API_KEY = os.environ["API_KEY"]
AUDIT_FILE = os.environ.get("AUDIT_FILE", "audit.jsonl")
PUBLIC_PATHS = {"/healthz"}
REQUEST_ID = re.compile(r"[A-Za-z0-9\-_.:/+=@]{1,128}")


def rate_interval(rate: str) -> float:
    """Seconds one request uses up, from "COUNT/s", "COUNT/m" or "COUNT/h"."""
    count, _, unit = rate.partition("/")
    per = {"s": 1, "m": 60, "h": 3600}.get(unit)
    if per is None or not count.isdigit() or int(count) == 0:
        raise SystemExit(f"RATE_LIMIT={rate!r}: expected COUNT/s, COUNT/m or COUNT/h, e.g. 60/m")
    return per / int(count)


# The same limit as ../proxy.toml's rate_limit: RATE_LIMIT per API key, bursts of 5.
RATE_INTERVAL = rate_interval(os.environ.get("RATE_LIMIT", "60/m"))
RATE_BURST = 5

rate_tat: dict[str | None, float] = {}  # per subject: when its bucket is full again (GCRA)

audit_queue: asyncio.Queue = asyncio.Queue(maxsize=10_000)
audit_task: asyncio.Task | None = None


async def audit_writer() -> None:
    """Drain the queue to a JSON-lines file so requests never wait on the disk."""
    while True:
        event = await audit_queue.get()
        with open(AUDIT_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")


# Starlette runs the middleware added last first: request id wraps timing wraps audit wraps
# the key check wraps the rate limit.
@app.middleware("http")
async def rate_limit(request: Request, call_next):
    if request.url.path in PUBLIC_PATHS:
        return await call_next(request)
    subject = getattr(request.state, "subject", None)
    now = time.monotonic()
    tat = max(rate_tat.get(subject, now), now)
    tolerance = RATE_BURST * RATE_INTERVAL
    if tat + RATE_INTERVAL - now > tolerance:
        return JSONResponse(
            {"error": "rate_limited", "message": "rate limit exceeded"},
            status_code=429,
            headers={
                "retry-after": str(math.ceil(tat + RATE_INTERVAL - tolerance - now)),
                "ratelimit-limit": str(RATE_BURST),
                "ratelimit-remaining": "0",
                "ratelimit-reset": str(math.ceil(tat - now)),
            },
        )
    rate_tat[subject] = tat + RATE_INTERVAL
    ahead = tat + RATE_INTERVAL - now  # how far the key's bucket is from full
    response = await call_next(request)
    response.headers["ratelimit-limit"] = str(RATE_BURST)
    response.headers["ratelimit-remaining"] = str(int((tolerance - ahead) / RATE_INTERVAL))
    response.headers["ratelimit-reset"] = str(math.ceil(ahead))
    return response


@app.middleware("http")
async def api_key_check(request: Request, call_next):
    if request.url.path not in PUBLIC_PATHS:
        given = request.headers.get("x-api-key", "")
        if not hmac.compare_digest(given.encode(), API_KEY.encode()):
            return JSONResponse(
                {"error": "unauthorized", "message": "missing or invalid API key"},
                status_code=401,
                headers={"www-authenticate": "ApiKey"},
            )
        request.state.subject = "example-client"
    return await call_next(request)


@app.middleware("http")
async def audit_log(request: Request, call_next):
    global audit_task
    if audit_task is None:  # started on the first request, inside the server's event loop
        audit_task = asyncio.create_task(audit_writer())
    started = time.perf_counter()
    response = await call_next(request)
    event = {
        "ts": datetime.now(timezone.utc).isoformat(),
        "request_id": request.state.request_id,
        "method": request.method,
        "path": request.url.path,
        "query": request.url.query or None,
        "status": response.status_code,
        "duration_ms": round((time.perf_counter() - started) * 1000, 3),
        "client_ip": request.client.host if request.client else None,
        "subject": getattr(request.state, "subject", None),
        "user_agent": request.headers.get("user-agent"),
    }
    try:
        audit_queue.put_nowait(event)
    except asyncio.QueueFull:
        pass  # never block a request on the audit log
    return response


@app.middleware("http")
async def timing_header(request: Request, call_next):
    started = time.perf_counter()
    response = await call_next(request)
    # Measured to the response head: a streamed body's time is not included.
    elapsed_ms = (time.perf_counter() - started) * 1000
    response.headers["x-response-time"] = f"{elapsed_ms:.3f}ms"
    response.headers["server-timing"] = f"app;dur={elapsed_ms:.3f}"
    return response


@app.middleware("http")
async def request_id(request: Request, call_next):
    given = request.headers.get("x-request-id", "")
    rid = given if REQUEST_ID.fullmatch(given) else str(uuid.uuid4())
    if rid != given:  # the routes read it from the request, like the one gatehouse sets
        request.scope["headers"] = [
            (k, v) for k, v in request.scope["headers"] if k != b"x-request-id"
        ] + [(b"x-request-id", rid.encode())]
    request.state.request_id = rid
    response = await call_next(request)
    response.headers["x-request-id"] = rid
    return response
