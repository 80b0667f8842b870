"""Benchmark a running WebUI: the per-step cost of SEG, measured over its API with paired requests.

    python -m seg_lib.bench_webui --url http://127.0.0.1:7860 [--size 512] [--checkpoint NAME] [--reps 2]

For each mode (SEG off, SEG on) it generates at two step counts and takes the difference, so that model
loading, text encoding and VAE decoding cancel out: per-step time = (t(long) - t(short)) / (long - short).
Requests of both modes are interleaved, same seed and size, and the medians are reported with their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import urllib.request
from typing import Any

TITLE = "Smoothed Energy Guidance"
MODES: dict[str, list[Any] | None] = {
    "SEG off": [False],
    "SEG on (mid block, sigma inf)": [True, 3.0, "inf", "m0", 0.0, 1.0],
}


def _post(url: str, payload: dict[str, Any]) -> float:
    request = urllib.request.Request(
        url + "/sdapi/v1/txt2img", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=3600) as response:
        response.read()
    return time.perf_counter() - start


def measure(url: str, size: int, checkpoint: str | None, reps: int, short: int, long: int) -> dict[str, float]:
    def payload(seg: list[Any] | None, steps: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": "a lighthouse on a cliff at dusk",
            "seed": 7,
            "steps": steps,
            "width": size,
            "height": size,
            "cfg_scale": 5,
            "sampler_name": "Euler",
            "save_images": False,
            "send_images": False,
            "alwayson_scripts": {TITLE: {"args": seg}},
        }
        if checkpoint:
            body["override_settings"] = {"sd_model_checkpoint": checkpoint}
        return body

    _post(url, payload(MODES["SEG on (mid block, sigma inf)"], short))  # warm-up (model load, caches)
    per_step: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(reps):
        for mode, seg in MODES.items():
            t_short = _post(url, payload(seg, short))
            t_long = _post(url, payload(seg, long))
            per_step[mode].append((t_long - t_short) / (long - short))
    return {mode: statistics.median(values) for mode, values in per_step.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m seg_lib.bench_webui", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--checkpoint", default=None, help="checkpoint title; default: the loaded one")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--short", type=int, default=2, help="steps of the short request")
    parser.add_argument("--long", type=int, default=6, help="steps of the long request")
    args = parser.parse_args(argv)
    results = measure(args.url.rstrip("/"), args.size, args.checkpoint, args.reps, args.short, args.long)
    base = results["SEG off"]
    print(f"{args.size}x{args.size}, Euler, CFG 5, checkpoint {args.checkpoint or '(loaded)'}, {args.reps} reps\n")
    print("| mode | s per step | ratio to SEG off |")
    print("|---|---|---|")
    for mode, seconds in results.items():
        print(f"| {mode} | {seconds:.2f} | {seconds / base:.2f}x |")


if __name__ == "__main__":
    main()
