"""Random-weight IP-Adapter SD1.5 files for the Forge-family ControlNet (sd_forge_ipadapter), byte-reproducible.

OUT/CLIP-ViT-H-14.safetensors: image encoder of the "CLIP-ViT-H (IPAdapter)" preprocessor, from the ViT-H config the
host's loader picks (reForge/Classic ldm_patched/modules/clip_vision.py + clip_vision_config_h.json; Forge/ersatz
backend/patcher/clipvision.py CLIP_VISION_H), built as transformers' CLIPVisionModelWithProjection on the meta device
(Forge/Classic load into it; reForge's clip_model.py uses the same names) + the int64 position_ids buffer that
transformers < 4.31 (Classic's 4.30.2) keeps. OUT/ip-adapter_sd15.safetensors: the SD1.5 non-plus adapter of
extensions-builtin/sd_forge_ipadapter/lib_ipadapter/IPAdapterPlus.py: image_proj.* (ImageProjModel: projection_dim ->
4 tokens x context dim, LayerNorm) and ip_adapter.{2n+1}.to_k_ip/to_v_ip.weight [attn2 width, context dim] for the
n-th of the 16 attn2 patches it installs (input blocks 1,2,4,5,7,8, output 3-11, middle); widths and context dim from
the host's SD1.5 config (configs/v1-inference.yaml, or backend/huggingface/runwayml/stable-diffusion-v1-5/unet).
Lab hosts (/work/lab/COMMITS.txt): reForge 3b56b26, Forge dfdcbab, Classic 1f95d71, ersatzForge fca12a2; all read
models/ControlNetPreprocessor/CLIP-ViT-H-14.safetensors and models/ControlNet/ip-adapter_sd15.safetensors.
Init as /work/shared/lab/make_checkpoints.py (weights N(0, 1/fan_in), biases and 1-dim N(0, 0.02^2), LayerNorm weight
N(1, 0.1^2) / bias N(0, 0.1^2), generators seeded by (seed, key)), fp16. Also writes OUT/SHA256SUMS.

Usage (a WebUI's venv python; existing files are kept unless --force):
  python tests/api/make_ip_adapter.py --out DIR [--seed 0] [--host WEBUI_DIR] [--force] [--check [--sd15 CKPT]]
--check (no server; cwd becomes the host) runs the host's code: its preprocessor + clip vision loader on a 224x224
random image, try_load_supported_control_model, IPAdapterPatcher.process_before_every_sampling on a stand-in UNet,
and each attn2 patch it installs, on tensors as wide as that layer (= CKPT's attn2.to_k, e.g. lab random-sd15).
"""

import argparse
import ast
import hashlib
import importlib.util
import json
import math
import os
import sys
import types

import torch
from torch import nn

CLIP_FILE, IPA_FILE = "CLIP-ViT-H-14.safetensors", "ip-adapter_sd15.safetensors"
ATTN2 = [("input", i) for i in (1, 2, 4, 5, 7, 8)] + [("output", i) for i in range(3, 12)] + [("middle", 0)]
TOKENS = 4  # IPAdapterPlus.py: clip_extra_context_tokens = 16 if plus or portrait else 4
PREFIX = {"input": "input_blocks.{}", "output": "output_blocks.{}", "middle": "middle_block"}


def key_seed(seed, key):
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") & (2**63 - 1)


def draw(seed, key, shape, norm=None):
    """N(0, 1/fan_in) for 2+ dims, N(0, 0.02^2) for 1 dim; LayerNorm (norm="weight"/"bias"): N(1 / 0, 0.1^2)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(key_seed(seed, key)), dtype=torch.float32)
    std = 0.1 if norm else 1 / math.sqrt(math.prod(shape[1:])) if len(shape) >= 2 else 0.02
    return (x * std + (1.0 if norm == "weight" else 0.0)).to(torch.float16)


def read(path):
    with open(path) as f:
        return f.read()


def clip_h_config(host):
    path = os.path.join(host, "ldm_patched", "modules", "clip_vision_config_h.json")
    if os.path.exists(path):
        return json.loads(read(path)), path
    path = os.path.join(host, "backend", "patcher", "clipvision.py")
    for node in ast.parse(read(path)).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "CLIP_VISION_H" for t in node.targets):
            return ast.literal_eval(node.value), path
    raise SystemExit(f"no ViT-H clip vision config in {host}")


def sd15_unet(host):
    """SD1.5 UNet channel widths per level and cross-attention context dim, from the host's config."""
    path = os.path.join(host, "backend", "huggingface", "runwayml", "stable-diffusion-v1-5", "unet", "config.json")
    if os.path.exists(path):
        c = json.loads(read(path))
        return c["block_out_channels"], c["cross_attention_dim"], path
    import yaml

    path = os.path.join(host, "configs", "v1-inference.yaml")
    c = yaml.safe_load(read(path))["model"]["params"]["unet_config"]["params"]
    return [c["model_channels"] * m for m in c["channel_mult"]], c["context_dim"], path


def width(widths, block):  # ldm block id -> level (3 blocks a level): input 1,2 -> 0; output 3-5 -> 2; middle -> last
    kind, i = block
    return widths[-1] if kind == "middle" else widths[(i - 1) // 3 if kind == "input" else 3 - i // 3]


def clip_state_dict(cfg, seed):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg))
    sd = {}
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            key = f"{mname}.{pname}"
            sd[key] = draw(seed, key, tuple(p.shape), pname if isinstance(mod, nn.LayerNorm) else None)
    sd["vision_model.embeddings.position_ids"] = torch.arange(model.vision_model.embeddings.num_positions)[None]
    return sd


def ipa_state_dict(emb_dim, widths, ctx, seed):
    shapes = {"image_proj.proj.weight": (TOKENS * ctx, emb_dim), "image_proj.proj.bias": (TOKENS * ctx,)}
    for n, block in enumerate(ATTN2):  # CrossAttentionPatch: patch n uses f"{2n+1}_to_k_ip" / "_to_v_ip"
        for kv in "kv":
            shapes[f"ip_adapter.{2 * n + 1}.to_{kv}_ip.weight"] = (width(widths, block), ctx)
    sd = {k: draw(seed, k, s) for k, s in shapes.items()}
    return sd | {f"image_proj.norm.{k}": draw(seed, f"image_proj.norm.{k}", (ctx,), k) for k in ("weight", "bias")}


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def check(host, out, sd15):
    os.chdir(host)
    sys.argv, os.environ["CUDA_VISIBLE_DEVICES"] = ["launch.py", "--always-cpu"], ""
    ext = os.path.join(host, "extensions-builtin")
    sys.path[:0] = [host, os.path.join(ext, "sd_forge_ipadapter"), os.path.join(ext, "sd_forge_controlnet")]
    if not os.path.isdir(os.path.join(host, "backend")):  # ldm_patched hosts: flags parsed as initialize_forge does
        from ldm_patched.modules import args_parser

        args_parser.args, _ = args_parser.parser.parse_known_args()
    import numpy as np
    from modules import options, shared, shared_options
    from safetensors import safe_open

    # the first step of modules/shared_init.initialize() (IPAdapterPlus reads shared.opts at import)
    shared.opts = options.Options(shared_options.options_templates, shared_options.restricted_opts)
    import modules_forge.supported_preprocessor as sp
    from modules_forge.shared import supported_preprocessors, try_load_supported_control_model

    spec = importlib.util.spec_from_file_location("ipa", f"{ext}/sd_forge_ipadapter/scripts/forge_ipadapter.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))  # registers the preprocessors and IPAdapterPatcher
    sp.preprocessor_dir = out  # instead of models/ControlNetPreprocessor: the preprocessor finds OUT/CLIP_FILE
    image = np.random.RandomState(0).randint(0, 256, (224, 224, 3), dtype=np.uint8)
    cond = supported_preprocessors["CLIP-ViT-H (IPAdapter)"](image, 512)
    clip, f = cond["clip_vision"], safe_open(os.path.join(out, CLIP_FILE), "pt")
    shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    model = {k: tuple(v.shape) for k, v in clip.model.state_dict().items()}
    bad = [k for k in model if shapes.get(k) != model[k]]  # the host's loader only warns about missing keys
    assert not bad, f"host clip vision keys missing or misshaped in the file: {bad}"
    print(f"{type(clip.model).__name__}: all {len(model)} keys in the file; extra: {sorted(set(shapes) - set(model))}")
    enc = clip.encode_image(torch.from_numpy(image).float()[None] / 255)
    for name in ("image_embeds", "penultimate_hidden_states"):
        assert torch.isfinite(enc[name]).all(), name
        print(f"encode_image {name}: {tuple(enc[name].shape)} std {enc[name].float().std():.3f}")
    patcher = try_load_supported_control_model(os.path.join(out, IPA_FILE))
    assert type(patcher).__name__ == "IPAdapterPatcher", patcher
    ns, sigmas = types.SimpleNamespace, types.SimpleNamespace(percent_to_sigma=lambda p: 1e9 * (1 - p))
    m = ns(model_sampling=sigmas, predictor=sigmas)

    def unet():  # what apply_ipadapter uses of the UNet patcher: clone(), model_options, the sigma schedule
        return ns(model=m, model_options={"transformer_options": {}}, clone=unet)

    process = ns(sd_model=ns(forge_objects=ns(unet=unet())))
    multi = "tiles" in cond  # ersatzForge's ControlNet hands IP-Adapters the list of its inputs' preprocessor outputs
    patcher.process_before_every_sampling(process, [cond] if multi else cond, None)
    patches = process.sd_model.forge_objects.unet.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert list(patches) == ATTN2, list(patches)
    (widths, ctx, _), ckpt = sd15_unet(host), sd15 and safe_open(sd15, "pt")
    g = torch.Generator().manual_seed(0)
    extra = {"cond_or_uncond": [0, 1], "sigmas": torch.ones(2), "n_heads": 8, "original_shape": [2, 4, 8, 8]}
    for (kind, i), patch in patches.items():
        w, key = width(widths, (kind, i)), f"model.diffusion_model.{PREFIX[kind].format(i)}.1.transformer_blocks.0"
        assert not ckpt or tuple(ckpt.get_slice(key + ".attn2.to_k.weight").get_shape()) == (w, ctx), key
        q, kv = torch.randn(2, 64, w, generator=g), torch.randn(2, 77, w, generator=g)
        o = patch(q, kv, kv, extra)
        patch.weights = [0.0]
        assert o.shape == q.shape, (kind, i)
        assert torch.isfinite(o).all(), (kind, i)
        assert not torch.allclose(o, patch(q, kv, kv, extra)), (kind, i)  # the output follows the adapter weight
    print(f"{len(patches)} attn2 patches {[f'{k}{i}' for k, i in patches]} ok; widths checked on {sd15}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--host", default=os.getcwd(), help="WebUI checkout whose configs are read (default: cwd)")
    ap.add_argument("--force", action="store_true", help="rebuild files that exist")
    ap.add_argument("--check", action="store_true", help="then load both files with the host's code (no server)")
    ap.add_argument("--sd15", help="with --check: an SD1.5 checkpoint whose attn2.to_k widths the adapter must match")
    a = ap.parse_args()
    from safetensors.torch import save_file

    host, out = os.path.abspath(a.host), os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    cfg, cfg_path = clip_h_config(host)
    widths, ctx, unet_path = sd15_unet(host)
    print(f"configs: {cfg_path}, {unet_path}")
    builds = {CLIP_FILE: lambda: clip_state_dict(cfg, a.seed)}
    builds[IPA_FILE] = lambda: ipa_state_dict(cfg["projection_dim"], widths, ctx, a.seed)
    for name, build in builds.items():
        path = os.path.join(out, name)
        if os.path.exists(path) and not a.force:
            print(f"{name}: exists, kept")
            continue
        sd = build()
        save_file(sd, path + ".tmp", metadata={"format": "pt"})
        os.replace(path + ".tmp", path)
        n = sum(v.numel() for v in sd.values())
        print(f"{name}: {len(sd)} tensors, {n / 1e6:.1f}M values, {os.path.getsize(path) / 2**20:.1f} MiB")
        del sd  # before the next one is built
    sums = "".join(f"{sha256(os.path.join(out, fn))}  {fn}\n" for fn in (CLIP_FILE, IPA_FILE))
    with open(os.path.join(out, "SHA256SUMS"), "w") as f:
        f.write(sums)
    print(sums, end="")
    print("link into each WebUI (reForge, Forge, Classic and ersatzForge read the same folders):")
    for name, folder in ((CLIP_FILE, "ControlNetPreprocessor"), (IPA_FILE, "ControlNet")):
        print(f"  ln -sfn {os.path.join(out, name)} WEBUI/models/{folder}/{name}")
    if a.check:
        check(host, out, a.sd15 and os.path.abspath(a.sd15))


if __name__ == "__main__":
    main()
