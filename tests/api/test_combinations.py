"""API tier: SEG next to other extensions in a running WebUI. Skipped unless SEG_WEBUI_URL is set; each
combination is skipped when the connected WebUI lacks the feature (a built-in of the other host, a
third-party extension that is not installed, a sampler of another version).

For each: the request with SEG on answers 200 with every image (never a lost image), SEG moved the pixels,
and the fast path makes the image of the separate extra pass (within 2/255 per channel; where the fast path
cannot vouch for the combination it falls back by itself, and both requests take the same path).
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from seg_lib.settings import FAST_PATH
from tests.api.test_webui_api import SIZE, TITLE, URL, base_payload, call

pytestmark = [pytest.mark.webui, pytest.mark.skipif(not URL, reason="set SEG_WEBUI_URL to run the API tier")]

SEG_ON = {"enabled": True, "scale": 30.0, "blur_sigma": 2.0, "layers": os.environ.get("SEG_LAYERS", "d0,m0,u2")}


def image_b64(seed: int, mask: bool = False) -> str:
    """A blocky random picture (or a centred square mask) of the test size, as base64 PNG."""
    import random

    from PIL import Image

    if mask:
        image = Image.new("RGB", (SIZE, SIZE))
        image.paste((255, 255, 255), (SIZE // 4, SIZE // 4, 3 * SIZE // 4, 3 * SIZE // 4))
    else:
        rng = random.Random(seed)
        small = Image.new("RGB", (SIZE // 16, SIZE // 16))
        small.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range((SIZE // 16) ** 2)])
        image = small.resize((SIZE, SIZE), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decode(image: str) -> torch.Tensor:
    from PIL import Image

    picture = Image.open(io.BytesIO(base64.b64decode(image))).convert("RGB")
    return torch.frombuffer(bytearray(picture.tobytes()), dtype=torch.uint8).to(torch.int16)


class Host:
    """What the connected WebUI offers: its always-on scripts with their arguments, samplers, ControlNet."""

    def __init__(self) -> None:
        status, info = call("/sdapi/v1/script-info")
        assert status == 200, info
        self.scripts = {(s["name"], s["is_img2img"]): s for s in info}
        status, samplers = call("/sdapi/v1/samplers")
        self.samplers = {s["name"] for s in samplers} if status == 200 else set()
        self.is_forge = ("never oom integrated", False) in self.scripts  # a Forge built-in
        status, models = call("/controlnet/model_list")
        self.controlnet_models = models.get("model_list", []) if status == 200 else None
        status, options = call("/sdapi/v1/options")
        self.options = set(options) if status == 200 else set()

    def setting(self, name: str, value: Any) -> dict[str, Any]:
        """``override_settings`` with a host setting; skips the test when the WebUI has no such setting."""
        if name not in self.options:
            pytest.skip(f"this WebUI has no setting '{name}'")
        return {name: value}

    def script(self, title: str, img2img: bool = False, on: bool = False, **by_label: Any) -> dict[str, Any]:
        """``alwayson_scripts`` entry with the script's own defaults, some set by UI label (``on``: the first
        one, the checkbox of an InputAccordion); skips the test when the WebUI has no such script. ``title``
        may name several spellings, ``|``-separated (the forks renamed some built-ins)."""
        found = [name for name in title.split("|") if (name.lower(), img2img) in self.scripts]
        if not found:
            pytest.skip(f"this WebUI has no '{title}' script")
        title = found[0]
        script = self.scripts[(title.lower(), img2img)]
        args = [arg["value"] for arg in script["args"]]
        if on:
            args[0] = True
        labels = [(arg["label"] or "").lower() for arg in script["args"]]
        for label, value in by_label.items():
            args[labels.index(label.replace("_", " ").lower())] = value
        return {title: {"args": args}}

    def controlnet(self, *units: dict[str, Any]) -> dict[str, Any]:
        if self.controlnet_models is None and ("controlnet", False) not in self.scripts:
            pytest.skip("this WebUI has no ControlNet")
        return {"ControlNet": {"args": list(units)}}

    def controlnet_model(self) -> str:
        models = [m for m in (self.controlnet_models or []) if m != "None"]
        if not models:
            pytest.skip("no ControlNet model installed")
        return models[0]

    def ip_adapter(self) -> dict[str, Any]:
        """Forge's IP-Adapter as a ControlNet unit: its CLIP-H preprocessor and an SD1.5 IP-Adapter model."""
        models = [m for m in (self.controlnet_models or []) if m.startswith("ip-adapter_sd15")]
        status, modules = call("/controlnet/module_list")
        if not models or status != 200 or IP_ADAPTER_MODULE not in modules.get("module_list", []):
            pytest.skip("no IP-Adapter preprocessor and ip-adapter_sd15 model in this WebUI")
        return self.controlnet(unit(IP_ADAPTER_MODULE, models[0]))

    def adetailer(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """ADetailer on with its first YOLO model at confidence 0 and one mask (a random-weight detector still
        finds boxes then), and SEG in its script list; (scripts entry, override settings)."""
        status, found = call("/adetailer/v1/ad_model")
        models = [m for m in found.get("ad_model", []) if m.endswith(".pt")] if status == 200 else []
        if ("adetailer", False) not in self.scripts or not models:
            pytest.skip("no ADetailer with a YOLO model in this WebUI")
        tab = {
            "ad_model": models[0],
            "ad_confidence": 0.0,
            "ad_mask_k": 1,
            "ad_mask_filter_method": "Area",
            "ad_use_steps": True,
            "ad_steps": 4,
            "ad_denoising_strength": 0.5,
        }
        settings = {"ad_only_selected_scripts": True, "ad_script_names": ADETAILER_SCRIPTS + ",seg"}
        return {"ADetailer": {"args": [True, False, tab]}}, settings

    def sampler(self, name: str) -> str:
        if name not in self.samplers:
            pytest.skip(f"this WebUI has no sampler '{name}'")
        return name


@pytest.fixture(scope="module")
def host() -> Host:
    status, scripts = call("/sdapi/v1/scripts")
    if status != 200 or TITLE.lower() not in [name.lower() for name in scripts["txt2img"]]:
        pytest.skip("the WebUI runs without the extension")
    return Host()


def unit(module: str, model: str = "None", **fields: Any) -> dict[str, Any]:
    return {
        "enabled": True,
        "module": module,
        "model": model,
        "weight": 1.0,
        "image": image_b64(7),
        "resize_mode": "Crop and Resize",
        "processor_res": SIZE,
        "threshold_a": 0.5,
        "threshold_b": 0.5,
        "guidance_start": 0.0,
        "guidance_end": 1.0,
        "control_mode": "Balanced",
        "pixel_perfect": False,
        **fields,
    }


IP_ADAPTER_MODULE = "CLIP-ViT-H (IPAdapter)"
# ADetailer 25.3's default script list; SEG's file stem added so SEG also runs in ADetailer's inpaint pass
ADETAILER_SCRIPTS = "dynamic_prompting,dynamic_thresholding,lora_block_weight,negpip,wildcard_recursive,wildcards"


def with_adetailer(host: Host) -> tuple[str, dict[str, Any], dict[str, Any]]:
    scripts, settings = host.adetailer()
    return TXT, {"override_settings": settings}, scripts


Build = Callable[[Host], tuple[str, dict[str, Any], dict[str, Any]]]  # -> (kind, request fields, scripts)
TXT = "txt2img"
COMBINATIONS: dict[str, Build] = {
    "controlnet_model": lambda h: (TXT, {}, h.controlnet(unit("canny", h.controlnet_model()))),
    "controlnet_reference": lambda h: (TXT, {}, h.controlnet(unit("reference_only"))),
    "controlnet_two_units_batch2": lambda h: (
        TXT,
        {"batch_size": 2},
        h.controlnet(unit("canny", h.controlnet_model()), unit("reference_only")),
    ),
    "soft_inpainting": lambda h: (
        "img2img",
        {"init_images": [image_b64(3)], "mask": image_b64(0, mask=True), "denoising_strength": 0.75},
        h.script("Soft Inpainting", img2img=True, soft_inpainting=True),
    ),
    "ddim_cfg_plus_plus": lambda h: (TXT, {"sampler_name": h.sampler("DDIM CFG++"), "cfg_scale": 1.0}, {}),
    "ngms": lambda h: (TXT, {"override_settings": {"s_min_uncond": 10.0}}, {}),
    "batch_cond_uncond_off": lambda h: (
        TXT,
        {"prompt": "a fox AND a cat", "override_settings": h.setting("batch_cond_uncond", False)},
        {},
    ),
    # A1111 third-party extensions (skipped when not installed)
    "dynamic_thresholding": lambda h: (
        TXT,
        {"cfg_scale": 15},
        h.script("Dynamic Thresholding (CFG Scale Fix)", on=True),
    ),
    "tiled_diffusion": lambda h: (
        TXT,
        {"width": SIZE + 128},
        h.script("Tiled Diffusion", enable_tiled_diffusion=True, latent_tile_width=32, latent_tile_height=32),
    ),
    "regional_prompter": lambda h: (
        TXT,
        {"prompt": "a red fox BREAK a snowy field"},
        h.script("Regional Prompter", on=True),
    ),
    "kohya_hires_fix": lambda h: (TXT, {}, h.script("Kohya Hires.fix", enable_extension=True)),
    "adetailer": with_adetailer,
    "forge_ip_adapter": lambda h: (TXT, {}, h.ip_adapter()),
    # Forge built-ins (skipped on A1111)
    "forge_freeu": lambda h: (TXT, {}, h.script("FreeU Integrated (SD 1.x, SD 2.x, SDXL)|FreeU Integrated", on=True)),
    "forge_sag": lambda h: (
        TXT,
        {},
        h.script("SelfAttentionGuidance Integrated (SD 1.x, SD 2.x, SDXL)|SelfAttentionGuidance Integrated", on=True),
    ),
    "forge_pag": lambda h: (TXT, {}, h.script("PerturbedAttentionGuidance Integrated", on=True)),
    "forge_dynamic_thresholding": lambda h: (
        TXT,
        {"cfg_scale": 15},
        h.script("DynamicThresholding (CFG-Fix) Integrated", enabled=True),
    ),
    "forge_kohya_hrfix": lambda h: (TXT, {}, h.script("Kohya HRFix Integrated", on=True)),
    "forge_multidiffusion": lambda h: (
        TXT,
        {"width": SIZE + 128},
        h.script("MultiDiffusion Integrated", enabled=True, tile_width=SIZE, tile_height=SIZE, tile_overlap=SIZE // 4),
    ),
    "forge_stylealign_batch2": lambda h: (
        TXT,
        {"batch_size": 2},
        h.script("StyleAlign Integrated", share_attention_in_batch=True),
    ),
    "forge_latent_modifier": lambda h: (TXT, {}, h.script("LatentModifier Integrated", on=True)),
    "forge_never_oom": lambda h: (TXT, {}, h.script("Never OOM Integrated", on=True)),
    "forge_hypertile": lambda h: (TXT, {}, h.script("Hypertile Integrated", enabled=True, tile_size=64)),
    "controlnet_inpaint_only": lambda h: (
        "img2img",
        {"init_images": [image_b64(3)], "mask": image_b64(0, mask=True), "denoising_strength": 0.75},
        h.controlnet(unit("inpaint_only", h.controlnet_model(), image=image_b64(3), mask_image=image_b64(0, True))),
    ),
    # reForge built-ins
    "reforge_apg": lambda h: (TXT, {}, h.script('"APG\'s now your CFG" and guidance limiter for reForge', on=True)),
    "reforge_rescalecfg": lambda h: (TXT, {}, h.script("RescaleCFG for reForge", on=True)),
    "reforge_mahiro": lambda h: (TXT, {}, h.script("MaHiRo CFG for reForge", on=True)),
    "reforge_advanced_model_sampling": lambda h: (TXT, {}, h.script("Advanced Model Sampling for reForge", on=True)),
    # Forge Classic built-ins
    "classic_rescalecfg": lambda h: (TXT, {}, h.script("RescaleCFG", rescale_cfg=0.7)),
}


# The defaults (A1111 1.10 / Forge `shared_options.py`, ADetailer 25.3, this extension) of every setting a
# combination overrides, for the settings the WebUI's config does not hold yet (see ``settings_kept``).
DEFAULTS: dict[str, Any] = {
    FAST_PATH: True,
    "s_min_uncond": 0.0,
    "batch_cond_uncond": True,
    "ad_only_selected_scripts": True,
    "ad_script_names": ADETAILER_SCRIPTS,
}


@pytest.fixture
def settings_kept(host: Host, name: str) -> Iterator[None]:
    """Puts back the settings the combination overrides. The WebUIs restore an override only for a setting
    their config already holds (``process_images`` keeps ``stored_opts`` of those alone), so one it lacks
    keeps the request's value for every later request: NGMS 10 left on by one test changed the images of
    the next file's "off" tests. Each goes back to its value before the test, or to its default; the
    settings are posted (which saves the WebUI's config) only when one was left changed."""
    _, fields, _ = COMBINATIONS[name](host)
    keys = {FAST_PATH, *fields.get("override_settings", {})}
    status, options = call("/sdapi/v1/options")
    assert status == 200, options
    before = {key: options[key] if key in options else DEFAULTS[key] for key in keys}
    yield
    status, options = call("/sdapi/v1/options")
    assert status == 200, options
    stuck = {key: value for key, value in before.items() if options.get(key, DEFAULTS[key]) != value}
    if stuck:  # posting settings saves the WebUI's config: only when the host left one changed
        status, answer = call("/sdapi/v1/options", stuck)
        assert status == 200, answer


def request(host: Host, name: str, seg: dict[str, Any] | None, fast: bool = True, **more: Any) -> list[Any]:
    kind, fields, scripts = COMBINATIONS[name](host)
    fields = {**fields, **more}
    payload = base_payload(**fields)
    payload["override_settings"] = {**fields.get("override_settings", {}), "seg_fast_path": fast}
    payload["alwayson_scripts"] = dict(scripts)
    if seg is not None:
        payload["alwayson_scripts"][TITLE] = {"args": [seg]}
    status, body = call(f"/sdapi/v1/{kind}", payload)
    assert status == 200, body  # never a lost image
    images = [decode(image) for image in body["images"]]
    assert len(images) >= fields.get("batch_size", 1)
    return images[: fields.get("batch_size", 1)]


# Where SEG says it cannot run and makes the image without its term (one console line): sd-webui-controlnet's
# reference units keep attention state that no extra pass can share (A1111 only; Forge's Reference works).
SEG_SKIPS_ON_A1111 = {"controlnet_reference", "controlnet_two_units_batch2"}


@pytest.mark.parametrize("name", list(COMBINATIONS))
def test_combination_keeps_the_image_and_the_fast_path_is_exact(host: Host, name: str, settings_kept: None) -> None:
    off = request(host, name, {"enabled": False})
    fast = request(host, name, SEG_ON, fast=True)
    separate = request(host, name, SEG_ON, fast=False)
    if name in SEG_SKIPS_ON_A1111 and not host.is_forge:
        for a, b, c in zip(fast, separate, off, strict=True):
            assert torch.equal(a, c), "SEG skipped: the image is the one without SEG"
            assert torch.equal(b, c), "SEG skipped: the image is the one without SEG"
        return
    if all(torch.equal(a, c) for a, c in zip(fast, off, strict=True)):
        # Forge main's soft inpainting (as tried) returns the same image at CFG 5 and 15 too: nothing that
        # guides the denoiser can show there. Only then is "SEG did not move the image" not SEG's doing.
        stronger = request(host, name, {"enabled": False}, cfg_scale=15)
        if all(torch.equal(a, c) for a, c in zip(stronger, off, strict=True)):
            pytest.skip(f"{name}: this WebUI's image does not depend on the guidance here (CFG 15 changes nothing)")
    for a, b, c in zip(fast, separate, off, strict=True):
        apart, moved = int((a - b).abs().max()), float((a - c).abs().float().mean())
        print(f"{name}: fast vs separate max {apart}/255; on vs off mean {moved:.2f}/255")
        assert moved > 0.5, "SEG did not move the image"
        noise = 0
        if apart > 2:  # how far the WebUI itself repeats this image: the separate pass once more
            again = request(host, name, SEG_ON, fast=False)
            noise = max(int((x - y).abs().max()) for x, y in zip(separate, again, strict=True))
            if noise > 2:  # ersatzForge's inpaint blends fresh unseeded noise at every step
                pytest.skip(f"{name}: the WebUI alone does not repeat its image here ({noise}/255 apart)")
            print(f"{name}: the separate pass repeats within {noise}/255")
        assert apart <= 2 + noise, f"fast path vs separate pass: {apart}/255 apart (the host repeats within {noise})"
