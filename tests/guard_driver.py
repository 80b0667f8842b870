"""One POST through ``SegArgumentGuard`` without a server: the body arrives in pieces, as uvicorn may deliver
it, and the app behind the guard records what reached it and answers 200 with ``{}``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from seg_lib.api import InfotextParser, SegArgumentGuard


def through_guard(
    pieces: list[bytes], path: str, title: str | Callable[[], str], parse_infotext: InfotextParser | None = None
) -> tuple[list[dict], list[bytes]]:
    """(the messages the guard sent back, the bodies that reached the app: none when the guard answered)."""
    messages = [{"type": "http.request", "body": p, "more_body": i < len(pieces) - 1} for i, p in enumerate(pieces)]
    sent: list[dict] = []
    seen: list[bytes] = []

    async def receive() -> dict:
        return messages.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    async def app(_scope: Any, receive_: Any, send_: Any) -> None:
        received = b""
        while True:
            message = await receive_()
            received += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen.append(received)
        await send_({"type": "http.response.start", "status": 200, "headers": []})
        await send_({"type": "http.response.body", "body": b"{}"})

    guard = SegArgumentGuard(app, title, parse_infotext)
    asyncio.run(guard({"type": "http", "method": "POST", "path": path}, receive, send))
    return sent, seen
