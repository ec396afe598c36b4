"""The example API *before* the migration: the same routes (imported from ../app.py) plus
the cross-cutting code every service used to carry in Python middleware:

* an `x-response-time` timing header,
* an API-key check answering 401,
* an audit log line per request, written by a background task.

gatehouse now does all three (and request ids and rate limiting) in front of the app; see
../proxy.toml and ../../README.md for the side-by-side walk-through.

    API_KEY=secret AUDIT_FILE=audit.jsonl uvicorn app:app --app-dir before --port 8000
"""

import asyncio
import hmac
import importlib.util
import json
import os
import time
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

audit_queue: asyncio.Queue = asyncio.Queue(maxsize=10_000)
audit_task: asyncio.Task | None = None


async def audit_writer() -> None:
    """Drain the queue to a JSON-lines file so requests never wait on the disk."""
    while True:
        event = await audit_queue.get()
        with open(AUDIT_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")


# Starlette runs the middleware added last first: timing wraps audit wraps the key check.
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
    response.headers["x-response-time"] = f"{(time.perf_counter() - started) * 1000:.3f}ms"
    return response
