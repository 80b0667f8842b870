"""Side by side with pamparamm/sd-perturbed-attention's SEG in one running WebUI (its home host is reForge).

    python -m tests.api.compare_pamparamm --url http://127.0.0.1:7873 [--size 128] [--steps 3] [--reps 3]
                                          [--bench-size 256] [--lists m0 d1,u2]

With both extensions installed, theirs owns the plain title "Smoothed Energy Guidance" (it loads first, by
folder name) and ours answers as "Smoothed Energy Guidance (sd-webui-seg)". For each setting (SEG scale 30,
so that SEG visibly moves random-weight images; sigma inf, 10 and 2; each layer list; CFG 5 and 1) it makes
the image with ours and with theirs and prints their largest and mean pixel difference next to how far each
moved the image from SEG off. Then the per-step cost of SEG off, ours (fast path) and theirs, from 2- vs
6-step requests interleaved in each repetition (as ``seg_lib.bench_webui``). Not a test: a report for the
README, all in one run.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import time
import urllib.request
from typing import Any

THEIRS, OURS = "Smoothed Energy Guidance", "Smoothed Energy Guidance (sd-webui-seg)"


def _post(url: str, payload: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    request = urllib.request.Request(
        url + "/sdapi/v1/txt2img", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=3600) as response:
        body = json.loads(response.read())
    return time.perf_counter() - start, body


def theirs_args(sigma: str, layers: str) -> list[Any]:
    """Their script's positional arguments: enabled, scale, rescale, rescale mode, blur sigma (-1 = inf),
    block, block id, block list, hires override and its five values, sigma start, sigma end."""
    blur = -1.0 if sigma == "inf" else float(sigma)
    return [True, 30.0, 0.0, "full", blur, "middle", 0, layers, False, 7.0, 3.0, 0.0, "full", -1.0, -1.0, -1.0]


def ours_args(sigma: str, layers: str) -> list[Any]:
    return [{"enabled": True, "scale": 30.0, "blur_sigma": sigma, "layers": layers}]


def _payload(size: int, steps: int, cfg: float, scripts: dict[str, Any], send: bool = True) -> dict[str, Any]:
    return {
        "prompt": "a lighthouse on a cliff",
        "negative_prompt": "blurry",
        "seed": 1234,
        "steps": steps,
        "width": size,
        "height": size,
        "cfg_scale": cfg,
        "sampler_name": "Euler",
        "send_images": send,
        "save_images": False,
        "alwayson_scripts": scripts,
    }


def _pixels(body: dict[str, Any]) -> Any:
    import numpy as np
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(body["images"][0]))).convert("RGB")
    return np.asarray(image).astype(np.int16)


def images(url: str, size: int, steps: int, lists: list[str]) -> None:
    print(f"## Images ({size}x{size}, {steps} steps, Euler, seed 1234, SEG scale 30)\n")
    print("| CFG | layers | sigma | ours vs theirs: max / mean | ours vs off (mean) | theirs vs off (mean) |")
    print("|---|---|---|---|---|---|")
    for cfg in (5.0, 1.0):
        off = _pixels(_post(url, _payload(size, steps, cfg, {}))[1])
        for layers in lists:
            for sigma in ("inf", "10", "2"):
                ours = _pixels(_post(url, _payload(size, steps, cfg, {OURS: {"args": ours_args(sigma, layers)}}))[1])
                body = _post(url, _payload(size, steps, cfg, {THEIRS: {"args": theirs_args(sigma, layers)}}))[1]
                theirs = _pixels(body)
                apart = abs(ours - theirs)
                print(
                    f"| {cfg:g} | `{layers}` | {sigma} | {apart.max()} / {apart.mean():.2f} "
                    f"| {abs(ours - off).mean():.2f} | {abs(theirs - off).mean():.2f} |"
                )


def cost(url: str, size: int, reps: int, layers: str, short: int = 2, long: int = 6) -> None:
    modes = {
        "SEG off": {},
        "ours (fast path)": {OURS: {"args": ours_args("inf", layers)}},
        "theirs": {THEIRS: {"args": theirs_args("inf", layers)}},
    }
    for scripts in modes.values():  # warm-up
        _post(url, _payload(size, short, 5.0, scripts, send=False))
    per_step: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(reps):
        for mode, scripts in modes.items():
            t_short = _post(url, _payload(size, short, 5.0, scripts, send=False))[0]
            t_long = _post(url, _payload(size, long, 5.0, scripts, send=False))[0]
            per_step[mode].append((t_long - t_short) / (long - short))
    base = statistics.median(per_step["SEG off"])
    print(f"\n## Cost ({size}x{size}, Euler, CFG 5, sigma inf, `{layers}`, {short} vs {long} steps, {reps} reps)\n")
    print("| mode | s per step (median) | ratio to SEG off | each repetition |")
    print("|---|---|---|---|")
    for mode, values in per_step.items():
        median = statistics.median(values)
        each = ", ".join(f"{value:.2f}" for value in values)
        print(f"| {mode} | {median:.2f} | {median / base:.2f}x | {each} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.api.compare_pamparamm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lists", nargs="+", default=["m0", "d1,u2"])
    parser.add_argument("--bench-size", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    url = args.url.rstrip("/")
    images(url, args.size, args.steps, args.lists)
    cost(url, args.bench_size, args.reps, args.lists[0])


if __name__ == "__main__":
    main()
