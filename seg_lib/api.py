"""Reject bad SEG arguments in API requests with an HTTP 422 that names the field.

The host runs script hooks inside try/except, so an invalid value found during generation could only be
logged. This ASGI middleware checks ``alwayson_scripts["Smoothed Energy Guidance"]["args"]`` of txt2img
and img2img requests before the host sees them and answers 422 with the message; valid requests pass
through untouched (the body is replayed as received).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from seg_lib.core.params import PARAMS, params_from_args

GENERATION_PATHS = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")
Message = dict[str, Any]
ASGIApp = Callable[
    [Mapping[str, Any], Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]


def check_request(body: bytes, title: str) -> str | None:
    """The error message for the SEG part of a generation request, or None when it is valid or absent."""
    try:
        request = json.loads(body or b"{}")
    except ValueError:
        return None  # not our business: the host answers malformed JSON itself
    scripts = request.get("alwayson_scripts") if isinstance(request, dict) else None
    if not isinstance(scripts, dict):
        return None
    entry = next((value for key, value in scripts.items() if str(key).lower() == title.lower()), None)
    if entry is None:
        return None
    args = entry.get("args") if isinstance(entry, dict) else None
    if args is None:
        return None
    if not isinstance(args, list):
        names = ", ".join(param.name for param in PARAMS)
        return f'SEG: "args" must be a list: positional values ({names}) or one object [{{...}}]'
    if any(isinstance(value, Mapping) for value in args) and len(args) != 1:
        return 'SEG: named arguments go in a list of one object: "args": [{"enabled": true, ...}]'
    try:
        params_from_args(args)
    except ValueError as error:
        return str(error)
    return None


class SegArgumentGuard:
    """ASGI middleware: 422 for invalid SEG arguments on the generation endpoints."""

    def __init__(self, app: ASGIApp, title: str) -> None:
        self.app = app
        self.title = title

    async def __call__(
        self,
        scope: Mapping[str, Any],
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST" or scope.get("path") not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        received: list[Message] = []
        body = b""
        while True:
            message = await receive()
            received.append(message)
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        error = check_request(body, self.title)
        if error is not None:
            payload = json.dumps({"error": "ValueError", "detail": error, "errors": error}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 422,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(payload)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": payload})
            return

        async def replay() -> Message:
            return received.pop(0) if received else await receive()

        await self.app(scope, replay, send)


def install(app: Any, title: str) -> None:
    """Add the guard to a FastAPI/Starlette app (from ``on_app_started``)."""
    app.add_middleware(SegArgumentGuard, title=title)
