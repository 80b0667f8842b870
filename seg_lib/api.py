"""Reject bad SEG arguments in API requests with an HTTP 422 that names the field; route our API alias.

The host runs script hooks inside try/except, so an invalid value found during generation could only be
logged. This ASGI middleware checks ``alwayson_scripts["Smoothed Energy Guidance"]["args"]`` of txt2img
and img2img requests before the host sees them and answers 422 with the message; valid requests pass
through untouched (the body is replayed as received). SEG keys in the request's ``infotext`` are checked
too: the host would otherwise convert them itself (``float("abc")`` there is an HTTP 500). When the host
finds us by the plain title, an entry under ``names.ALIAS`` is renamed to it first (see ``names.py``); when
another script owns the plain title, its entry is not ours to check. Other SEG extensions' keys in the
``infotext`` field are converted to ours (the API never runs the paste callback that does it elsewhere).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from seg_lib.core.params import BY_INFOTEXT, PARAMS, SegParams, params_from_args
from seg_lib.core.paste import imported_infotext
from seg_lib.log import log
from seg_lib.names import ALIAS, TITLE

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


def prepare_request(
    body: bytes, title: str, parse_infotext: InfotextParser | None = None
) -> tuple[bytes | None, str | None]:
    """For a generation request's body, given the title the host finds us by: the body to pass on instead
    (None: unchanged) and the error message for its SEG part (None: valid or absent).

    Checks every ``alwayson_scripts`` entry the host would take for SEG (it matches titles case-blind, and
    the last one wins), and, with the host's infotext parser, the SEG keys of ``infotext``.
    """
    try:
        request = json.loads(body or b"{}")
    except (ValueError, RecursionError):
        return None, None  # not our business: the host answers malformed JSON itself
    if not isinstance(request, dict):
        return None, None
    changed = _import_infotext(request)
    scripts = request.get("alwayson_scripts")
    if isinstance(scripts, dict):
        keys = {str(key).lower(): key for key in scripts}
        if title.lower() == TITLE.lower() and ALIAS.lower() in keys:
            if TITLE.lower() in keys:
                return None, f'SEG: "{TITLE}" and "{ALIAS}" both name this extension in this WebUI; send one of them'
            scripts[TITLE] = scripts.pop(keys[ALIAS.lower()])
            changed = json.dumps(request).encode()
        for key, entry in scripts.items():
            if str(key).lower() == title.lower() and (error := _check_args(str(key), entry)) is not None:
                return None, _short(error)
    text = request.get("infotext")
    if (
        parse_infotext is not None
        and isinstance(text, str)
        and text
        and (error := _check_infotext(text, parse_infotext))
    ):
        return None, _short(error)
    return changed, None


def check_request(body: bytes, title: str, parse_infotext: InfotextParser | None = None) -> str | None:
    """The error message for the SEG part of a generation request, or None when it is valid or absent."""
    return prepare_request(body, title, parse_infotext)[1]


class SegArgumentGuard:
    """ASGI middleware: 422 for invalid SEG arguments on the generation endpoints."""

    def __init__(
        self, app: ASGIApp, title: str | Callable[[], str], parse_infotext: InfotextParser | None = None
    ) -> None:
        self.app = app
        self.title = title  # or how to find it per request: another script may own the plain title
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
            title = self.title() if callable(self.title) else self.title
            replaced, error = prepare_request(body, title, self.parse_infotext)
        except Exception as failure:  # a bug here must not cost the user the request: the host decides
            log(f"could not check the SEG arguments of this request ({failure!r}); passing it on unchecked")
            replaced, error = None, None
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

        if replaced is not None:  # the alias renamed or the infotext converted: one message with the new body
            received = [{"type": "http.request", "body": replaced, "more_body": False}]
            headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
            scope = {**scope, "headers": [*headers, (b"content-length", str(len(replaced)).encode())]}

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


def install(app: Any, title: str | Callable[[], str]) -> None:
    """Add the guard to a FastAPI/Starlette app (from ``on_app_started``).

    With the UI, the host calls this after the app has served requests; Starlette then refuses
    ``add_middleware`` while its built stack exists. Dropping the stack, as the hosts' own
    ``setup_middleware`` does, has it rebuilt with the guard on the next request.
    """
    if getattr(app, "middleware_stack", None) is not None:
        app.middleware_stack = None
    app.add_middleware(SegArgumentGuard, title=title, parse_infotext=host_infotext_parser())
