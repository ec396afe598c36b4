"""The example API *after* the migration: routes only.

Request ids, the timing header, the API-key check, rate limiting and the audit log are done
by gatehouse in front of it (see proxy.toml); before/app.py shows the Python middleware this
replaced. Run it on loopback only, so nothing reaches it around gatehouse:

    uvicorn app:app --host 127.0.0.1 --port 8000
"""

import asyncio

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

app = FastAPI(title="gatehouse FastAPI example")


@app.get("/healthz")
async def healthz() -> dict:
    return {"ok": True}


@app.get("/items/{item_id}")
async def read_item(item_id: int, request: Request) -> dict:
    # gatehouse sets x-request-id on the way in and removes the API key (api_key strip = true),
    # so the app can log the id and never holds the credential.
    return {
        "id": item_id,
        "name": f"item {item_id}",
        "request_id": request.headers.get("x-request-id"),
        "api_key_seen": "x-api-key" in request.headers,
    }


# A typical list endpoint's payload, ~20 KiB of JSON: what response compression is for
# (bench.sh --gzip compresses it in Python, before/gzip_app.py, or in gatehouse).
CATALOG = {
    "items": [
        {
            "id": i,
            "sku": f"SKU-{i:06d}",
            "name": f"item {i}",
            "description": f"A sturdy item number {i}, shipped in a recyclable box.",
            "price_cents": 199 + 37 * i,
            "in_stock": i % 3 != 0,
            "tags": ["catalog", f"group-{i % 7}", "sale" if i % 5 == 0 else "regular"],
        }
        for i in range(108)
    ],
    "page": 1,
    "next": "/catalog?page=2",
}


@app.get("/catalog")
async def catalog() -> dict:
    return CATALOG


@app.get("/slow")
async def slow(seconds: float = 0.5) -> dict:
    """A slow endpoint (a report, a model call): the timing header shows where time went."""
    await asyncio.sleep(min(seconds, 10.0))
    return {"slept": seconds}


@app.get("/stream")
async def stream(chunks: int = 5, interval: float = 0.2) -> StreamingResponse:
    """Chunks written over time: gatehouse forwards each one as it comes (no buffering)."""

    async def body():
        for i in range(min(chunks, 100)):
            if i:
                await asyncio.sleep(interval)
            yield f"chunk {i}\n"

    return StreamingResponse(body(), media_type="text/plain")
