"""Benchmark a running WebUI: the per-step cost of SEG, measured over its API with paired requests.

    python -m seg_lib.bench_webui --url http://127.0.0.1:7860 [--size 512] [--checkpoint NAME] [--reps 2]
                                  [--layers m0] [--sigma inf] [--scripts JSON|@file.json]
                                  [--manifest DIR/manifest.json --family sd35]

Three modes, same seed, size and sampler: SEG off; SEG with the separate extra UNet pass (the fast SEG
setting off, through ``override_settings``); SEG on the fast path (A1111: forked inside the host's UNet call;
Forge: in the same batch). For each mode it generates at two step counts and takes the difference, so that
model loading, text encoding and VAE decoding cancel out: per-step time = (t(long) - t(short)) / (long -
short). The modes' requests are interleaved within each repetition; medians are reported with their ratios.
``--scripts`` adds other extensions' always-on scripts to every request (e.g. a ControlNet unit), in the API's
``alwayson_scripts`` form. ``--manifest``/``--family``: a DiT of the lab's manifest (``tests/api/make_dit_models.py``),
with the request fields it needs (checkpoint, text encoders and VAE, CFG, sampler); the fork's saving is printed
as the share of the separate pass's extra cost that the fast path does not pay. The date, this machine's load
average and free memory are printed at the start and the end (the server is assumed to run on this machine).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
import urllib.request
from pathlib import Path
from typing import Any

from seg_lib.settings import FAST_PATH
from seg_lib.ui import TITLE

OFF, SEPARATE, FAST = "SEG off", "SEG, separate extra pass", "SEG, fast path"


def _post(url: str, payload: dict[str, Any]) -> float:
    request = urllib.request.Request(
        url + "/sdapi/v1/txt2img", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=3600) as response:
        response.read()
    return time.perf_counter() - start


def machine_state() -> str:
    """This machine's load and free memory: a ratio is only read from a quiet machine (the server runs here)."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    try:
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        available = next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable:"))
        memory = f", {available / 2**20:.1f} GiB available"
    except (OSError, StopIteration, ValueError):
        memory = ""
    return f"{now}: {os.cpu_count()} CPUs, load average {load}{memory}"


def measure(
    url: str,
    size: int,
    checkpoint: str | None,
    reps: int,
    short: int,
    long: int,
    layers: str,
    sigma: str,
    scripts: dict[str, Any] | None = None,
    request: dict[str, Any] | None = None,
) -> dict[str, list[float]]:
    """Per-step seconds of each mode, one value per repetition."""
    seg_on = [True, 3.0, sigma, layers, 0.0, 1.0]
    modes: dict[str, tuple[list[Any], bool]] = {OFF: ([False], True), SEPARATE: (seg_on, False), FAST: (seg_on, True)}

    def payload(mode: str, steps: int) -> dict[str, Any]:
        seg, fast = modes[mode]
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
            "alwayson_scripts": {**(scripts or {}), TITLE: {"args": seg}},
            "override_settings": {FAST_PATH: fast},
            "override_settings_restore_afterwards": True,
        }
        for key, value in (request or {}).items():  # a DiT's own fields (CFG, sampler, its modules)
            if key == "override_settings":
                body["override_settings"] = {**value, **body["override_settings"]}
            elif key not in ("width", "height", "steps", "batch_size", "n_iter"):
                body[key] = value
        if checkpoint:
            body["override_settings"]["sd_model_checkpoint"] = checkpoint
        return body

    for mode in modes:  # warm-up (model load, caches, first-call allocations)
        _post(url, payload(mode, short))
    per_step: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(reps):
        for mode in modes:
            t_short = _post(url, payload(mode, short))
            t_long = _post(url, payload(mode, long))
            per_step[mode].append((t_long - t_short) / (long - short))
    return per_step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m seg_lib.bench_webui", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--checkpoint", default=None, help="checkpoint title; default: the loaded one")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--short", type=int, default=2, help="steps of the short request")
    parser.add_argument("--long", type=int, default=6, help="steps of the long request")
    parser.add_argument("--layers", default="m0", help="SEG layers (default: the middle block)")
    parser.add_argument("--sigma", default="inf", help="SEG blur sigma")
    parser.add_argument("--scripts", default=None, help="other always-on scripts, as JSON or @file.json")
    parser.add_argument("--manifest", default=None, help="the lab's DiT manifest.json (with --family)")
    parser.add_argument("--family", default=None, help="a family of the manifest, e.g. sd35, flux, chroma")
    args = parser.parse_args(argv)
    request = None
    if args.manifest or args.family:
        if not (args.manifest and args.family):
            parser.error("--manifest and --family go together")
        request = json.loads(Path(args.manifest).read_text())["families"][args.family]["request"]
    before = machine_state()
    scripts = None
    if args.scripts:
        text = Path(args.scripts[1:]).read_text() if args.scripts.startswith("@") else args.scripts
        scripts = json.loads(text)
    per_rep = measure(
        args.url.rstrip("/"),
        args.size,
        args.checkpoint,
        args.reps,
        args.short,
        args.long,
        args.layers,
        args.sigma,
        scripts,
        request,
    )
    results = {mode: statistics.median(values) for mode, values in per_rep.items()}
    base = results[OFF]
    cfg = (request or {}).get("cfg_scale", 5)
    what = f"{args.family}, " if args.family else ""
    sampler = (request or {}).get("sampler_name", "Euler")
    print(
        f"{what}{args.size}x{args.size}, {sampler}, CFG {cfg:g}, layers {args.layers}, sigma {args.sigma}, checkpoint "
        f"{args.checkpoint or '(loaded)'}, steps {args.short} vs {args.long}, {args.reps} reps"
        f"{', with ' + ', '.join(scripts) if scripts else ''}"
    )
    print(f"machine at the start: {before}\nmachine at the end:   {machine_state()}\n")
    print("| mode | s per step (median) | ratio to SEG off | ratio to the separate pass | each repetition |")
    print("|---|---|---|---|---|")
    for mode, seconds in results.items():
        each = ", ".join(f"{value:.2f}" for value in per_rep[mode])
        print(f"| {mode} | {seconds:.2f} | {seconds / base:.2f}x | {seconds / results[SEPARATE]:.2f}x | {each} |")
    # Ratios within a repetition: its requests ran back to back, so the machine's drift cancels best there.
    ratios = [f"{fast / off:.2f}x" for off, fast in zip(per_rep[OFF], per_rep[FAST], strict=True)]
    print(f"\nfast path / SEG off, per repetition: {', '.join(ratios)}")
    extra = results[SEPARATE] - base
    if extra > 0:
        saved = (results[SEPARATE] - results[FAST]) / extra
        print(f"the fork saves {saved:.0%} of the separate pass's extra cost (median of the modes' medians)")


if __name__ == "__main__":
    main()
