"""Reject bad SEG arguments in API requests with an HTTP 422 that names the field; route our API alias.

The host runs script hooks inside try/except, so an invalid value found during generation could only be
logged. This ASGI middleware checks ``alwayson_scripts["Smoothed Energy Guidance"]["args"]`` of txt2img
and img2img requests before the host sees them and answers 422 with the message; valid requests pass
through untouched (the body is replayed as received). When the host finds us by the plain title, an entry
under ``names.ALIAS`` is renamed to it first (see ``names.py``); when another script owns the plain title,
its entry is not ours to check.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from seg_lib.core.params import PARAMS, params_from_args
from seg_lib.core.paste import imported_infotext
from seg_lib.log import log
from seg_lib.names import ALIAS, TITLE

GENERATION_PATHS = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")
Message = dict[str, Any]
ASGIApp = Callable[
    [Mapping[str, Any], Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]


def _entry_error(entry: Any) -> str | None:
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


def _import_infotext(request: dict[str, Any]) -> bytes | None:
    """Another SEG extension's keys in the request's ``infotext``: add ours (the host's API parses that field
    without the paste callback that converts them on PNG Info and in the UI). The new body, or None."""
    text = request.get("infotext")
    if not isinstance(text, str) or not text:
        return None
    converted, notes = imported_infotext(text)
    for note in notes:
        log(f"infotext: {note}")
    if converted is None:
        return None
    request["infotext"] = converted
    return json.dumps(request).encode()


def prepare_request(body: bytes, title: str) -> tuple[bytes | None, str | None]:
    """For a generation request's body, given the title the host finds us by: the body to pass on instead
    (None: unchanged) and the error message for its SEG entry (None: valid or absent)."""
    try:
        request = json.loads(body or b"{}")
    except ValueError:
        return None, None  # not our business: the host answers malformed JSON itself
    if not isinstance(request, dict):
        return None, None
    changed = _import_infotext(request)
    scripts = request.get("alwayson_scripts")
    if not isinstance(scripts, dict):
        return changed, None
    keys = {str(key).lower(): key for key in scripts}
    if title.lower() == TITLE.lower() and ALIAS.lower() in keys:
        if TITLE.lower() in keys:
            return None, f'SEG: "{TITLE}" and "{ALIAS}" both name this extension in this WebUI; send one of them'
        scripts[TITLE] = scripts.pop(keys[ALIAS.lower()])
        keys[TITLE.lower()] = TITLE
        changed = json.dumps(request).encode()
    ours = keys.get(title.lower())
    return changed, None if ours is None else _entry_error(scripts[ours])


def check_request(body: bytes, title: str) -> str | None:
    """The error message for the SEG part of a generation request, or None when it is valid or absent."""
    return prepare_request(body, title)[1]


class SegArgumentGuard:
    """ASGI middleware: 422 for invalid SEG arguments on the generation endpoints."""

    def __init__(self, app: ASGIApp, title: str | Callable[[], str]) -> None:
        self.app = app
        self.title = title  # or how to find it per request: another script may own the plain title

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
        title = self.title() if callable(self.title) else self.title
        replaced, error = prepare_request(body, title)
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

        if replaced is not None:  # the alias renamed: one message with the new body
            received = [{"type": "http.request", "body": replaced, "more_body": False}]
            headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
            scope = {**scope, "headers": [*headers, (b"content-length", str(len(replaced)).encode())]}

        async def replay() -> Message:
            return received.pop(0) if received else await receive()

        await self.app(scope, replay, send)


def install(app: Any, title: str | Callable[[], str]) -> None:
    """Add the guard to a FastAPI/Starlette app (from ``on_app_started``)."""
    app.add_middleware(SegArgumentGuard, title=title)
