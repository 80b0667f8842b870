"""A small client for the reliability runs (soak, faults, concurrency, HTTP fuzz) against a running WebUI.

Requests are kept tiny (SD1.5, 64-128 px, 1-3 steps) so that hundreds of them fit in minutes on a CPU.
Settings (environment): ``SEG_WEBUI_URL``; ``SEG_SD15_CHECKPOINT`` / ``SEG_INPAINT_CHECKPOINT`` /
``SEG_SDXL_CHECKPOINT`` titles.
"""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import time
import urllib.error
import urllib.request
from typing import Any

URL = os.environ.get("SEG_WEBUI_URL", "").rstrip("/")
TITLE = "Smoothed Energy Guidance"
SD15 = os.environ.get("SEG_SD15_CHECKPOINT", "random-sd15.safetensors")
INPAINT = os.environ.get("SEG_INPAINT_CHECKPOINT", "random-sd15-inpainting.safetensors")
SDXL = os.environ.get("SEG_SDXL_CHECKPOINT", "random-sdxl.safetensors")
SEG_KEYS = ("SEG Scale", "SEG Sigma", "SEG Layers", "SEG Start", "SEG End")
OFF = [False, 3.0, "inf", "m0", 0.0, 1.0]


def call(path: str, payload: Any = None, timeout: float = 600, raw: bytes | None = None) -> tuple[int, Any, float]:
    """(HTTP status, parsed JSON answer or its text, seconds). Connection failures are status 0."""
    data = raw if raw is not None else None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(URL + path, data=data, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, text = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
        return 0, repr(error), time.perf_counter() - start
    seconds = time.perf_counter() - start
    try:
        return status, json.loads(text or b"null"), seconds
    except ValueError:
        return status, text.decode(errors="replace"), seconds


def pixels(image_b64: str) -> bytes:
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(image_b64))).convert("RGB").tobytes()


def images(body: dict[str, Any]) -> list[bytes]:
    return [pixels(image) for image in body["images"]]


def _png(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def init_image(width: int, height: int) -> tuple[str, str]:
    """A deterministic init image and a centre mask (base64 PNGs)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (90, 140, 200))
    ImageDraw.Draw(image).ellipse((width // 6, height // 6, 5 * width // 6, 5 * height // 6), fill=(220, 180, 60))
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=255)
    return _png(image), _png(mask)


def is_forge() -> bool:
    status, options, _ = call("/sdapi/v1/options")
    return status == 200 and "forge_additional_modules" in options


def payload(kind: str, seg: list[Any] | None, *, forge: bool, **fields: Any) -> dict[str, Any]:
    """A tiny request: ``kind`` is txt2img, img2img, inpaint or hires. ``seg`` None leaves SEG unnamed."""
    width, height = fields.pop("width", 64), fields.pop("height", 64)
    body: dict[str, Any] = {
        "prompt": "a lighthouse on a cliff",
        "negative_prompt": "blurry",
        "seed": 1234,
        "steps": 2,
        "width": width,
        "height": height,
        "cfg_scale": 5,
        "sampler_name": "Euler",
        "override_settings": {"sd_model_checkpoint": SD15},
        "override_settings_restore_afterwards": False,  # restoring would reload the checkpoint every time
    }
    if kind in ("img2img", "inpaint"):
        init, mask = init_image(width, height)
        body.update(init_images=[init], denoising_strength=0.75)
        if kind == "inpaint":
            body.update(mask=mask, mask_blur=0, inpainting_fill=1, inpaint_full_res=False)
    if kind == "hires":
        body.update(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", hr_second_pass_steps=1, denoising_strength=0.6)
        if forge:  # Forge's API fails a hires request that leaves this out
            body["hr_additional_modules"] = ["Use same choices"]
    settings = fields.pop("override_settings", {})
    body.update(fields)
    body["override_settings"] = {**body["override_settings"], **settings}
    if seg is not None:
        body["alwayson_scripts"] = {TITLE: {"args": seg}}
        # Overrides stay set after the request, so a request with SEG names the fast-path setting: otherwise
        # an earlier request's choice carries over (images differ by float rounding between the two paths).
        body["override_settings"] = {"seg_fast_path": True, **body["override_settings"]}
    return body


def endpoint(kind: str) -> str:
    return "/sdapi/v1/txt2img" if kind in ("txt2img", "hires") else "/sdapi/v1/img2img"


def generate(kind: str, seg: list[Any] | None, *, forge: bool, **fields: Any) -> tuple[dict[str, Any], float]:
    status, body, seconds = call(endpoint(kind), payload(kind, seg, forge=forge, **fields))
    if status != 200:
        raise AssertionError(f"{kind} answered {status}: {str(body)[:500]}")
    return body, seconds


def infotext(body: dict[str, Any]) -> str:
    return json.loads(body["info"])["infotexts"][0]


def rss_mib() -> float:
    """Resident memory of the server process (A1111/Forge ``/sdapi/v1/memory``: psutil's rss)."""
    status, body, _ = call("/sdapi/v1/memory")
    assert status == 200, body
    return body["ram"]["used"] / 2**20


def _probe(route: str, body: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """A route of the test-only probe extension (tests/api/seg_probe), POST when ``body`` is given; None
    when the probe is not installed."""
    status, answer, _ = call(f"/seg-probe/{route}", body)
    return answer if status == 200 else None


def registrations() -> dict[str, Any] | None:
    """What SEG registered in the host, from the test-only probe extension (tests/api/seg_probe); None
    when the probe is not installed."""
    return _probe("registrations")


def live_objects() -> dict[str, Any] | None:
    """SEG's live objects in the server after a full collection; None without the probe."""
    return _probe("live")


def heap_figures() -> dict[str, Any] | None:
    """The server's heap in use and held free, read without a trim; None without the probe."""
    return _probe("heap")


def trimmed_rss() -> dict[str, Any] | None:
    """The server's RSS before and after glibc's malloc_trim; None without the probe."""
    return _probe("trim", {})


def wait_until_up(timeout: float = 600) -> float:
    """Seconds until the API answers again (after a reload or restart)."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if call("/sdapi/v1/sd-models", timeout=10)[0] == 200:
            return time.perf_counter() - start
        time.sleep(1)
    raise AssertionError(f"the WebUI did not answer within {timeout} s")


def in_background(path: str, body: dict[str, Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Send a request from a thread; the result lands in the returned dict (status, body, seconds)."""
    result: dict[str, Any] = {}

    def run() -> None:
        result["status"], result["body"], result["seconds"] = call(path, body)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result
