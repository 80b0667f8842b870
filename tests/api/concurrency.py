"""Two clients at once, SEG and non-SEG requests mixed: each image must equal the one the same request gives
when sent alone (the hosts queue requests; no SEG state may leak from one request into another)."""

from __future__ import annotations

import os
import threading
from typing import Any

from tests.api.webui import OFF, call, endpoint, images, payload

HOST_VARIES = ("img2img", "inpaint") if not os.environ.get("SEG_STRICT_IMG2IMG") else ()
CLIENT_A: list[tuple[str, list[Any] | None, dict[str, Any]]] = [
    ("txt2img", [True, 3.0, "inf", "m0", 0.0, 1.0], {"seed": 1}),
    ("txt2img", OFF, {"seed": 2, "batch_size": 2}),
    ("img2img", [True, 6.0, "2", "d0,u2", 0.0, 1.0], {"seed": 3}),
    (
        "txt2img",
        [{"enabled": True, "scale": 5, "layers": "u1"}],
        {"seed": 4, "override_settings": {"seg_fast_path": False}},
    ),
]
CLIENT_B: list[tuple[str, list[Any] | None, dict[str, Any]]] = [
    ("txt2img", None, {"seed": 1}),  # the same seed as A's SEG-on request: a leak would show here
    ("hires", [True, 3.0, "4", "m0", 0.2, 0.8], {"seed": 5}),
    ("inpaint", None, {"seed": 3}),
    ("txt2img", [True, 10.0, "inf", "d0-d5", 0.0, 1.0], {"seed": 6, "cfg_scale": 1}),
]


def _send(item: tuple[str, list[Any] | None, dict[str, Any]], *, forge: bool) -> list[bytes] | str:
    kind, seg, fields = item
    status, body, _ = call(endpoint(kind), payload(kind, seg, forge=forge, **fields))
    return images(body) if status == 200 else f"{status}: {str(body)[:200]}"


def run_concurrency(*, forge: bool, rounds: int = 2) -> dict[str, Any]:
    alone = {
        client: [_send(item, forge=forge) for item in items] for client, items in (("A", CLIENT_A), ("B", CLIENT_B))
    }
    mismatches: list[str] = []
    host: list[str] = []
    requests = len(CLIENT_A) + len(CLIENT_B)
    for round_ in range(rounds):
        got: dict[str, list[Any]] = {"A": [], "B": []}

        def client(name: str, items: list[Any], out: list[Any]) -> None:
            out.extend(_send(item, forge=forge) for item in items)

        threads = [
            threading.Thread(target=client, args=("A", CLIENT_A, got["A"])),
            threading.Thread(target=client, args=("B", CLIENT_B, got["B"])),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        requests += len(CLIENT_A) + len(CLIENT_B)
        for name, items in (("A", CLIENT_A), ("B", CLIENT_B)):
            for index, (seen, expected) in enumerate(zip(got[name], alone[name], strict=True)):
                if seen == expected and not isinstance(seen, str):
                    continue
                label = f"round {round_} client {name} request {index} ({items[index][0]})"
                # A1111 1.10.1's own img2img differs under concurrent requests with SEG not named at all
                # (README, Reliability): reported apart, not counted against SEG.
                (host if items[index][0] in HOST_VARIES and not isinstance(seen, str) else mismatches).append(label)
    return {"requests": requests, "rounds_concurrent": rounds, "mismatches": mismatches, "img2img_differs": host}
