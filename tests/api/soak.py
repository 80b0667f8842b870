"""The soak: hundreds of small mixed requests against one running WebUI, with figures.

The plan is a block A of requests, a random middle, then block A again: the repeat must give the same
images (nothing accumulated), and its SEG-on requests time against the first ones like for like (drift).
Every 20 requests the probes run (SEG off equals the WebUI without the extension; SEG on equals round 0).
"""

from __future__ import annotations

import random
import time
from typing import Any

from tests.api.probes import ProbeCheck
from tests.api.webui import SEG_KEYS, call, endpoint, heap_figures, images, live_objects, payload, rss_mib, trimmed_rss

KINDS = ["txt2img", "txt2img", "img2img", "inpaint", "hires"]
LAYERS = ["m0", "d0-d5", "u0-u8", "d2,m0,u3", "m0.0", "u1-u3", "d0,u8", "d1-d3,u4.0", "input4", "output3"]
SIGMAS = [0.5, 1, 2, "4", 16, 100, "inf", 10000]
WINDOWS = [(0.0, 1.0), (0.0, 0.5), (0.3, 1.0), (0.2, 0.8), (0.5, 0.5)]
# Not UniPC: A1111 refuses it with fewer steps than its order (3), and these requests take 1-3 steps.
PREFERRED_SAMPLERS = ["Euler", "Euler a", "DPM++ 2M", "DDIM", "Heun", "LMS"]


def samplers() -> list[str]:
    status, found, _ = call("/sdapi/v1/samplers")
    assert status == 200, found
    names = {sampler["name"] for sampler in found}
    return [name for name in PREFERRED_SAMPLERS if name in names]


def seg_args(rng: random.Random, on: bool) -> list[Any] | None:
    """Random valid SEG arguments in the positional or the named form; None: SEG not named at all."""
    if not on:
        return rng.choice([None, [False], [{"enabled": False, "scale": 7}], [False, 2.0, "4", "u1", 0.2, 0.9]])
    start, end = rng.choice(WINDOWS)
    values = [True, round(rng.uniform(0.5, 10), 2), rng.choice(SIGMAS), rng.choice(LAYERS), start, end]
    if rng.random() < 0.5:
        return values
    names = ["enabled", "scale", "blur_sigma", "layers", "start", "end"]
    return [{name: value for name, value in zip(names, values, strict=True) if rng.random() < 0.8 or name == "enabled"}]


def spec(rng: random.Random, sampler_names: list[str], on: bool) -> dict[str, Any]:
    kind = rng.choice(KINDS)
    width, height = (64, 64) if kind == "hires" else (rng.choice([64, 64, 96, 128]), rng.choice([64, 64, 96]))
    return {
        "kind": kind,
        "seg": seg_args(rng, on),
        "fields": {
            "width": width,
            "height": height,
            "batch_size": rng.choice([1, 1, 2, 3]),
            "steps": rng.choice([1, 1, 1, 2, 3]),
            "sampler_name": rng.choice(sampler_names),
            "cfg_scale": rng.choice([5, 5, 1]),
            "seed": rng.randint(0, 2**31),
            "override_settings": {"seg_fast_path": rng.random() < 0.6},
        },
    }


def plan(total: int, block: int, seed: int, sampler_names: list[str]) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    first = [spec(rng, sampler_names, on=rng.random() < 0.6) for _ in range(block)]
    off = [item for item in first if item["seg"] is None or not _on(item["seg"])]
    for item in off[: max(0, 20 - (block - len(off)))]:
        item["seg"] = seg_args(rng, on=True)  # at least 20 SEG-on requests in the block that repeats
    middle = [spec(rng, sampler_names, on=rng.random() < 0.6) for _ in range(total - 2 * block)]
    return first + middle + first


def _on(seg: list[Any]) -> bool:
    return bool(seg[0]["enabled"] if isinstance(seg[0], dict) else seg[0])


def run_soak(
    host: str, *, forge: bool, total: int = 200, block: int = 40, seed: int = 12, control: bool = False
) -> dict[str, Any]:
    """``control``: the same plan against the WebUI without the extension, SEG never named: the host's own
    RSS growth and time drift, to read SEG's figures against."""
    requests = plan(total, block, seed, samplers())
    planned_on = [item["seg"] is not None and _on(item["seg"]) for item in requests]
    if control:  # SEG never named; the drift still compares the requests that are SEG-on in SEG's run
        for item in requests:
            item["seg"] = None
            item["fields"].pop("override_settings", None)  # SEG's setting: unknown to the host without SEG (HTTP 500)
    probes = ProbeCheck(host, forge=forge, control=control)
    rss = {"start": rss_mib()}
    live = {"start": live_objects()}  # SEG's own objects alive between generations (the probe extension)
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    heap: dict[str, Any] = {}
    began = time.perf_counter()
    for index, item in enumerate(requests):
        if index % 20 == 0:
            probes.check(f"before request {index}", None if index == 0 else ["probe-t2i"])
            rss[f"after {index}"] = rss_mib()
        if index == block:
            rss["after warm-up"] = rss_mib()  # the first block ran every kind of request once at least
            heap["after warm-up"] = heap_figures()  # read only: a trim here would make regrowth look like growth
            live["after warm-up"] = live_objects()
        if index == total - block:
            rss["before the repeated block"] = rss_mib()
        request = payload(item["kind"], item["seg"], forge=forge, **item["fields"])
        status, body, seconds = call(endpoint(item["kind"]), request)
        on = item["seg"] is not None and _on(item["seg"])
        result = {"index": index, "kind": item["kind"], "on": on, "status": status, "seconds": seconds}
        if status != 200:
            errors.append(f"request {index} ({item['kind']}, seg={item['seg']}): {status} {str(body)[:300]}")
        else:
            result["pixels"] = images(body)
            claims = all(key in body["info"] for key in SEG_KEYS)
            if claims != on:
                errors.append(f"request {index}: SEG {'on' if on else 'off'} but infotext claims={claims}")
        results.append(result)
    probes.check(f"after request {len(requests)}")
    rss["end"] = rss_mib()
    live["end"] = live_objects()
    heap["end"] = heap_figures()
    in_use = [(heap.get(key) or {}).get("in_use_mib") for key in ("after warm-up", "end")]
    trim = trimmed_rss()  # last: what of the end's RSS the allocator held free
    repeat = results[-block:]
    pairs = zip(repeat, results[:block], strict=True)
    mismatches = [again["index"] for again, first in pairs if again.get("pixels") != first.get("pixels")]
    first_on = [r for r in results[:block] if planned_on[r["index"]]][:20]
    last_on = [results[len(results) - block + (r["index"])] for r in first_on]
    drift = sum(r["seconds"] for r in last_on) / sum(r["seconds"] for r in first_on) - 1
    # the same for the repeated block's SEG-off requests: how much the machine itself drifted meanwhile
    first_off = [r for r in results[:block] if not planned_on[r["index"]]]
    last_off = [results[len(results) - block + r["index"]] for r in first_off]
    drift_off = sum(r["seconds"] for r in last_off) / sum(r["seconds"] for r in first_off) - 1 if first_off else None
    return {
        "requests": len(requests),
        "errors": errors,
        "minutes": round((time.perf_counter() - began) / 60, 1),
        "kinds": {kind: sum(r["kind"] == kind for r in results) for kind in set(KINDS)},
        "seg_on": sum(r["on"] for r in results),
        "batch_sizes": sorted({s["fields"]["batch_size"] for s in requests}),
        "samplers": sorted({s["fields"]["sampler_name"] for s in requests}),
        "rss_mib": {key: round(value, 1) for key, value in rss.items()},
        "rss_growth_after_warmup_mib": round(rss["end"] - rss["after warm-up"], 1),
        "rss_growth_over_repeated_block_mib": round(rss["end"] - rss["before the repeated block"], 1),
        "heap": heap,
        "heap_in_use_growth_after_warmup_mib": None if None in in_use else round(in_use[1] - in_use[0], 1),
        "rss_malloc_trim_at_end": trim,
        "seg_live_objects": live,
        "repeat_block_mismatches": mismatches,
        "drift_last20_vs_first20_seg_on": round(drift, 4),
        "first20_seg_on_seconds": round(sum(r["seconds"] for r in first_on), 2),
        "last20_seg_on_seconds": round(sum(r["seconds"] for r in last_on), 2),
        "drift_repeated_block_seg_off": None if drift_off is None else round(drift_off, 4),
        "seconds": [[r["kind"], r["on"], round(r["seconds"], 2)] for r in results],
        **probes.figures(),
    }
