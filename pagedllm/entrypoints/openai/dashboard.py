"""The live dashboard: ``GET /dashboard`` (a page refreshing every second), its static files
(``/dashboard/static/...``, uPlot vendored from npm: no CDN) and ``GET /dashboard/data``, the
same numbers ``/metrics`` exposes, as JSON read from the app's ServerMetrics registry.

With ``--api-key`` all three need the key (vLLM guards /v1 only; the dashboard shows load and
latency, so it is guarded like the API): ``Authorization: Bearer <key>`` as for /v1, or HTTP
Basic with the key as password (any user name), which a browser asks for on the 401 and then
sends with the page's own requests. /metrics stays open, as in vLLM, for Prometheus.
"""
from __future__ import annotations

import base64
import hmac
import math
import time
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response

STATIC_DIR = Path(__file__).resolve().parent / "static"
_STATIC_FILES = {"uPlot.iife.min.js": "text/javascript", "uPlot.min.css": "text/css",
                 "dashboard.js": "text/javascript", "uPlot.LICENSE": "text/plain"}


def _authorized(request: Request, api_key: str) -> bool:
    """Bearer <key>, or Basic base64(user:key); constant-time comparison of the key."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "basic":
        try:
            token = base64.b64decode(token, validate=True).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.encode(), api_key.encode())


def _unauthorized() -> Response:
    return JSONResponse({"error": {"message": "Unauthorized: the dashboard needs the API key "
                                   "(Authorization: Bearer <key>, or Basic with the key as "
                                   "password)", "type": "AuthenticationError", "code": 401}},
                        status_code=401,
                        headers={"WWW-Authenticate": 'Basic realm="pagedllm dashboard"'})


def _json_number(value: float) -> Optional[float]:
    """JSON has no inf/NaN: they become null (a histogram's +Inf bucket bound, an undefined
    rate)."""
    return value if math.isfinite(value) else None


def snapshot(registry) -> dict:
    """Every sample of the registry: ``metrics`` maps a sample name to its value summed over
    label sets (as a scrape reads it), ``labelled`` keeps the per-label values of the
    multi-label ones, ``histograms`` the cumulative buckets of each histogram."""
    metrics: dict[str, float] = {}
    labelled: dict[str, list] = {}
    histograms: dict[str, dict] = {}
    for family in registry.collect():
        for sample in family.samples:
            metrics[sample.name] = metrics.get(sample.name, 0.0) + sample.value
            labels = {k: v for k, v in sample.labels.items() if k not in ("le", "model_name")}
            if labels and family.type != "info" and not sample.name.endswith("_info"):
                labelled.setdefault(sample.name, []).append([labels, sample.value])
            if family.type == "histogram" and sample.name.endswith("_bucket"):
                hist = histograms.setdefault(family.name, {"le": [], "counts": []})
                hist["le"].append(_json_number(float(sample.labels["le"])))
                hist["counts"].append(sample.value)
    metrics = {name: _json_number(value) for name, value in metrics.items()}
    return {"time": time.time(), "metrics": metrics, "labelled": labelled,
            "histograms": histograms}


def add_dashboard_routes(app: FastAPI, metrics, api_key: Optional[str]) -> None:
    """Mount /dashboard, /dashboard/static/<file> and /dashboard/data on the app."""

    def guard(request: Request) -> Optional[Response]:
        return None if not api_key or _authorized(request, api_key) else _unauthorized()

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard_page(request: Request) -> Response:
        return guard(request) or FileResponse(STATIC_DIR / "dashboard.html",
                                              media_type="text/html",
                                              headers={"Cache-Control": "no-store"})

    @app.get("/dashboard/static/{name}", include_in_schema=False)
    async def dashboard_static(name: str, request: Request) -> Response:
        if name not in _STATIC_FILES:  # a fixed list: no path from the request reaches disk
            return Response(status_code=404)
        return guard(request) or FileResponse(STATIC_DIR / name, media_type=_STATIC_FILES[name])

    @app.get("/dashboard/data", include_in_schema=False)
    async def dashboard_data(request: Request) -> Response:
        return guard(request) or JSONResponse({"model_name": metrics.model_name,
                                               **snapshot(metrics.registry)})
