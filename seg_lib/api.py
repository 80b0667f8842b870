"""Reject bad SEG arguments in API requests with an HTTP 422 that names the field.

The host runs script hooks inside try/except, so an invalid value found during generation could only be
logged. This ASGI middleware checks ``alwayson_scripts["Smoothed Energy Guidance"]["args"]`` of txt2img
and img2img requests before the host sees them and answers 422 with the message; valid requests pass
through untouched (the body is replayed as received). SEG keys in the request's ``infotext`` are checked
too: the host would otherwise convert them itself (``float("abc")`` there is an HTTP 500).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from seg_lib.core.params import BY_INFOTEXT, PARAMS, SegParams, params_from_args
from seg_lib.log import log

GENERATION_PATHS = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")
MAX_MESSAGE = 600  # an error echoes the value it got; a 1 MB string need not come back whole
Message = dict[str, Any]
InfotextParser = Callable[[str], Mapping[str, Any]]
ASGIApp = Callable[
    [Mapping[str, Any], Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]


def _short(message: str) -> str:
    if len(message) <= MAX_MESSAGE:
        return message
    half = MAX_MESSAGE // 2
    return f"{message[:half]} ... ({len(message) - MAX_MESSAGE} characters left out) ... {message[-half:]}"


def _check_args(key: str, entry: object) -> str | None:
    if not isinstance(entry, Mapping):
        # the host would index it with "args" (HTTP 500 for a number or a text)
        return f'SEG: alwayson_scripts["{key}"] must be an object such as {{"args": [true]}}; got {entry!r}'
    extra = sorted(str(name) for name in entry if name != "args")
    if extra:  # the host ignores them, but echoes them in its answer: a 20-digit number there is an HTTP 500
        return f'SEG: alwayson_scripts["{key}"] takes only "args"; got {", ".join(map(repr, extra))}'
    if "args" not in entry:
        return None  # the host runs the script with its defaults
    args = entry["args"]
    if not isinstance(args, list):
        names = ", ".join(param.name for param in PARAMS)
        return f'SEG: "args" must be a list: positional values ({names}) or one object [{{...}}]; got {args!r}'
    if any(isinstance(value, Mapping) for value in args) and len(args) != 1:
        return 'SEG: named arguments go in a list of one object: "args": [{"enabled": true, ...}]'
    try:
        params_from_args(args)
    except ValueError as error:
        return str(error)
    return None


def _check_infotext(text: str, parse: InfotextParser) -> str | None:
    try:
        fields = parse(text)
    except Exception:  # the host's own parser: whatever it makes of this text is the host's answer
        return None
    values: dict[str, Any] = {}
    for key, param in BY_INFOTEXT.items():
        if key in fields:
            try:
                values[param.name] = param.check(fields[key])
            except ValueError as error:
                return f'SEG: infotext "{key}": {error}'
    try:
        SegParams(**values)
    except ValueError as error:
        return f"SEG: infotext: {error}"
    return None


def check_request(body: bytes, title: str, parse_infotext: InfotextParser | None = None) -> str | None:
    """The error message for the SEG part of a generation request, or None when it is valid or absent.

    Checks every ``alwayson_scripts`` entry the host would take for SEG (it matches titles case-blind, and
    the last one wins), and, with the host's infotext parser, the SEG keys of ``infotext``.
    """
    try:
        request = json.loads(body or b"{}")
    except (ValueError, RecursionError):
        return None  # not our business: the host answers malformed JSON itself
    if not isinstance(request, dict):
        return None
    scripts = request.get("alwayson_scripts")
    if isinstance(scripts, dict):
        for key, entry in scripts.items():
            if str(key).lower() == title.lower() and (error := _check_args(str(key), entry)) is not None:
                return _short(error)
    text = request.get("infotext")
    if (
        parse_infotext is not None
        and isinstance(text, str)
        and text
        and (error := _check_infotext(text, parse_infotext))
    ):
        return _short(error)
    return None


class SegArgumentGuard:
    """ASGI middleware: 422 for invalid SEG arguments on the generation endpoints."""

    def __init__(self, app: ASGIApp, title: str, parse_infotext: InfotextParser | None = None) -> None:
        self.app = app
        self.title = title
        self.parse_infotext = parse_infotext

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
        try:
            error = check_request(body, self.title, self.parse_infotext)
        except Exception as failure:  # a bug here must not cost the user the request: the host decides
            log(f"could not check the SEG arguments of this request ({failure!r}); passing it on unchecked")
            error = None
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


def host_infotext_parser() -> InfotextParser | None:
    """The host's infotext parser (``infotext_utils`` since A1111 1.8; the old module name before)."""
    try:
        from modules.infotext_utils import parse_generation_parameters
    except ImportError:
        try:
            from modules.generation_parameters_copypaste import parse_generation_parameters
        except ImportError:
            return None
    return parse_generation_parameters


def install(app: Any, title: str) -> None:
    """Add the guard to a FastAPI/Starlette app (from ``on_app_started``).

    With the UI, the host calls this after the app has served requests; Starlette then refuses
    ``add_middleware`` while its built stack exists. Dropping the stack, as the hosts' own
    ``setup_middleware`` does, has it rebuilt with the guard on the next request.
    """
    if getattr(app, "middleware_stack", None) is not None:
        app.middleware_stack = None
    app.add_middleware(SegArgumentGuard, title=title, parse_infotext=host_infotext_parser())
