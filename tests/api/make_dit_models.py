"""Small random-weight DiT checkpoints in the key layouts Forge-family WebUIs load, byte-reproducible.

Usage (any Python with torch; safetensors is not needed, the files are written by `write_safetensors` below):
  python tests/api/make_dit_models.py --out DIR [--families sd35,flux,flux-schnell,chroma] [--seed 0] [--force]
Writes the files of the families asked for, DIR/SHA256SUMS and DIR/manifest.json:
  {"families": {NAME: {"checkpoint": FILE, "files": [{"file": FILE, "folder": "models/..."}, ...],
                       "hosts": ["forge", "ersatz"], "request": {txt2img fields}}}}
Link each file into WEBUI/<folder>/ and POST the request (plus prompt and seed) to /sdapi/v1/txt2img.
Existing files are kept unless --force (the manifest and SHA256SUMS are always rewritten).

What the hosts fix and what they read from the weights (Forge main dfdcbab6, ersatzForge fca12a2, read from source):
- sd35: an SD3.5-Medium-like MMDiT-X, all in one file (MMDiT + 16-channel VAE + CLIP-L + CLIP-G + T5), because Forge
  main fills its VAE/TE module list only when it builds the Gradio UI: with --nowebui, override_settings'
  forge_additional_modules finds no file. Both hosts read depth from x_embedder (width 64 * depth, heads = depth), so
  depth 10 (width 640) keeps joint blocks 7-9 (Skip Layer Guidance's layers). pos_embed_max_size 384 is what makes
  both hosts build Medium's image-only x_block.attn2 (layers 0-12, here all 10); pos_embed is the fixed 2D sin-cos.
- flux, flux-schnell, chroma: ersatzForge only. Forge main's detection fixes 19 double + 38 single blocks at width
  3072; its Linear layers get their weight from the file, so blocks missing from a small file keep weight None and
  the first forward fails. ersatzForge counts the blocks and reads the width from img_in, but its forward
  preallocates 24 heads x 128 and a 3072 + 12288 single-block buffer (and Chroma's approximator is fixed at
  64 -> 5120 x 5 -> 3072): width 3072 it is, with 2 double + 1 single blocks. The single block's MLP (12288) is
  fixed by that buffer; the double blocks' img_mlp / txt_mlp are plain Linears, so they are 256 wide instead of
  12288 (about 190M multiply-adds per token instead of 450M; Flux runs 256 T5 + 256 image tokens a row).
- Text encoders come from the hosts' fixed configs: CLIP-L (12 x 768) and CLIP-G (32 x 1280) at full size (their
  LayerNorms and attention reshapes fix the width). T5-XXL keeps d_model 4096 (T5LayerNorm and the 32128 x 4096
  embedding are fixed), but its q/k/v/o and feed-forward Linears take the weight they are given: inner width 64
  (64 heads of 1) and d_ff 64 load and run, 176M parameters instead of 4.8B. 64 is none of the widths (384, 768,
  1024, 2048) ersatzForge maps to a distilled T5 config.
- VAE: the 16-channel Flux/SD3 layout (ldm keys, no quant convs), full size: its convolutions and GroupNorms are
  fixed-shape modules.

Lab prerequisites found on the way (host code untouched): both hosts pin protobuf 3.20.0, and a fresh install pulls
sentencepiece 0.2.1+, whose model_pb2 needs protobuf 5 ("cannot import name 'runtime_version'"): the SD3 T5 tokenizer
(add_prefix_space) is converted from the slow one at load, so SD3.5 fails until sentencepiece==0.2.0 is installed in
the host's venv. ersatzForge's Chroma reads opts.use_dynamicPE, an option it no longer declares: add
"use_dynamicPE": false to ersatz's config.json, or every Chroma request fails with AttributeError.

Init as /work/shared/lab/make_checkpoints.py: every tensor from its own generator seeded by (seed, component, key):
weights (2+ dims) N(0, 1/fan_in), biases N(0, 0.02^2), norm weights N(1, 0.1^2) and biases N(0, 0.1^2), so that no
layer outputs a constant; stored fp16. Same seed + same torch -> same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

# key, shape, init kind: "w" N(0, 1/fan_in), "b" N(0, 0.02^2), "nw" N(1, 0.1^2), "nb" N(0, 0.1^2), "pos" sin-cos
Spec = tuple[str, tuple[int, ...], str]

FLUX_WIDTH, FLUX_DOUBLE, FLUX_SINGLE = 3072, 2, 1
FLUX_DOUBLE_MLP = 256  # img_mlp / txt_mlp hidden width (12288 in Flux): a Sequential of Linears, any width loads
SD35_DEPTH, SD35_POS = 10, 384  # width 64 * depth; pos_embed_max_size 384 = Medium (attn2 in layers 0-12)
T5_MODEL, T5_LAYERS, T5_HEADS, T5_INNER, T5_FF, T5_VOCAB = 4096, 24, 64, 64, 64, 32128
CLIP_L = {"width": 768, "layers": 12, "mlp": 3072}
CLIP_G = {"width": 1280, "layers": 32, "mlp": 5120}

CLIP_FILE, T5_FILE, AE_FILE = "random-clip-l.safetensors", "random-t5xxl-narrow.safetensors", "random-ae16.safetensors"
CKPT, TE, VAE = "models/Stable-diffusion", "models/text_encoder", "models/VAE"


def linear(p: str, out: int, inp: int, bias: bool = True) -> list[Spec]:
    return [(f"{p}.weight", (out, inp), "w")] + ([(f"{p}.bias", (out,), "b")] if bias else [])


def conv(p: str, out: int, inp: int, k: int) -> list[Spec]:
    return [(f"{p}.weight", (out, inp, k, k), "w"), (f"{p}.bias", (out,), "b")]


def norm(p: str, dim: int, bias: bool = True, name: str = "weight") -> list[Spec]:
    return [(f"{p}.{name}", (dim,), "nw")] + ([(f"{p}.bias", (dim,), "nb")] if bias else [])


def clip_text(width: int, layers: int, mlp: int) -> list[Spec]:
    """transformers CLIPTextModel keys (text_model.*) + text_projection, as clip_l/clip_g.safetensors ship them."""
    s: list[Spec] = [
        ("text_model.embeddings.token_embedding.weight", (49408, width), "w"),
        ("text_model.embeddings.position_embedding.weight", (77, width), "w"),
    ]
    for i in range(layers):
        p = f"text_model.encoder.layers.{i}"
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s += linear(f"{p}.self_attn.{n}", width, width)
        s += norm(f"{p}.layer_norm1", width) + linear(f"{p}.mlp.fc1", mlp, width)
        s += linear(f"{p}.mlp.fc2", width, mlp) + norm(f"{p}.layer_norm2", width)
    # SD3 projects the pooled CLIP outputs with it; Flux ignores it
    return [*s, *norm("text_model.final_layer_norm", width), *linear("text_projection", width, width, bias=False)]


def t5_narrow() -> list[Spec]:
    """T5-XXL encoder keys (encoder.block.*, shared) with d_model 4096 but q/k/v/o and d_ff 64 wide."""
    s: list[Spec] = [("shared.weight", (T5_VOCAB, T5_MODEL), "w")]
    for i in range(T5_LAYERS):
        p = f"encoder.block.{i}.layer"
        for n in "qkv":
            s += linear(f"{p}.0.SelfAttention.{n}", T5_INNER, T5_MODEL, bias=False)
        s += linear(f"{p}.0.SelfAttention.o", T5_MODEL, T5_INNER, bias=False)
        if i == 0:  # T5 (not UMT5): only the first block has the relative position bias
            s.append((f"{p}.0.SelfAttention.relative_attention_bias.weight", (32, T5_HEADS), "w"))
        s += norm(f"{p}.0.layer_norm", T5_MODEL, bias=False)
        s += linear(f"{p}.1.DenseReluDense.wi_0", T5_FF, T5_MODEL, bias=False)
        s += linear(f"{p}.1.DenseReluDense.wi_1", T5_FF, T5_MODEL, bias=False)
        s += linear(f"{p}.1.DenseReluDense.wo", T5_MODEL, T5_FF, bias=False)
        s += norm(f"{p}.1.layer_norm", T5_MODEL, bias=False)
    return s + norm("encoder.final_layer_norm", T5_MODEL, bias=False)


def vae16() -> list[Spec]:
    """The 16-channel Flux / SD3 autoencoder in ldm keys (ae.safetensors): ch 128, mult 1,2,4,4, 2 res blocks."""
    ch, mult, z = 128, (1, 2, 4, 4), 16

    def res(p: str, cin: int, cout: int) -> list[Spec]:
        s = norm(f"{p}.norm1", cin) + conv(f"{p}.conv1", cout, cin, 3) + norm(f"{p}.norm2", cout)
        s += conv(f"{p}.conv2", cout, cout, 3)
        return s + (conv(f"{p}.nin_shortcut", cout, cin, 1) if cin != cout else [])

    def mid(p: str, c: int) -> list[Spec]:
        s = res(f"{p}.block_1", c, c) + norm(f"{p}.attn_1.norm", c)
        for n in ("q", "k", "v", "proj_out"):
            s += conv(f"{p}.attn_1.{n}", c, c, 1)
        return s + res(f"{p}.block_2", c, c)

    s = conv("encoder.conv_in", ch, 3, 3)
    cin = ch
    for i, m in enumerate(mult):
        for j in range(2):
            s += res(f"encoder.down.{i}.block.{j}", cin, ch * m)
            cin = ch * m
        if i < len(mult) - 1:
            s += conv(f"encoder.down.{i}.downsample.conv", cin, cin, 3)
    s += mid("encoder.mid", cin) + norm("encoder.norm_out", cin) + conv("encoder.conv_out", 2 * z, cin, 3)
    s += conv("decoder.conv_in", cin, z, 3) + mid("decoder.mid", cin)
    for i in reversed(range(len(mult))):
        for j in range(3):
            s += res(f"decoder.up.{i}.block.{j}", cin, ch * mult[i])
            cin = ch * mult[i]
        if i > 0:
            s += conv(f"decoder.up.{i}.upsample.conv", cin, cin, 3)
    return s + norm("decoder.norm_out", cin) + conv("decoder.conv_out", 3, cin, 3)


def mmdit(depth: int = SD35_DEPTH, pos: int = SD35_POS) -> list[Spec]:
    """SD3.5 MMDiT(-X) keys (model.diffusion_model.* of sd3.5_medium.safetensors without the prefix)."""
    h = 64 * depth
    attn2 = range(13) if pos == 384 else range(0)  # what both hosts' MMDiTX derive from pos_embed_max_size

    def attn(p: str, proj: bool = True) -> list[Spec]:
        s = linear(f"{p}.qkv", 3 * h, h) + (linear(f"{p}.proj", h, h) if proj else [])
        return s + norm(f"{p}.ln_q", 64, bias=False) + norm(f"{p}.ln_k", 64, bias=False)

    def mlp(p: str) -> list[Spec]:
        return linear(f"{p}.fc1", 4 * h, h) + linear(f"{p}.fc2", h, 4 * h)

    s: list[Spec] = [*conv("x_embedder.proj", h, 16, 2), ("pos_embed", (1, pos * pos, h), "pos")]
    s += linear("t_embedder.mlp.0", h, 256) + linear("t_embedder.mlp.2", h, h)
    s += linear("y_embedder.mlp.0", h, 2048) + linear("y_embedder.mlp.2", h, h) + linear("context_embedder", h, 4096)
    for i in range(depth):
        c, x = f"joint_blocks.{i}.context_block", f"joint_blocks.{i}.x_block"
        if i == depth - 1:  # the last context block is "pre_only": no proj, no MLP, 2 modulations
            s += linear(f"{c}.adaLN_modulation.1", 2 * h, h) + attn(f"{c}.attn", proj=False)
        else:
            s += linear(f"{c}.adaLN_modulation.1", 6 * h, h) + attn(f"{c}.attn") + mlp(f"{c}.mlp")
        s += linear(f"{x}.adaLN_modulation.1", (9 if i in attn2 else 6) * h, h) + attn(f"{x}.attn")
        s += (attn(f"{x}.attn2") if i in attn2 else []) + mlp(f"{x}.mlp")
    return s + linear("final_layer.linear", 64, h) + linear("final_layer.adaLN_modulation.1", 2 * h, h)


def flux(
    kind: str, h: int = FLUX_WIDTH, double: int = FLUX_DOUBLE, single: int = FLUX_SINGLE, mlp: int = FLUX_DOUBLE_MLP
) -> list[Spec]:
    """BFL Flux keys (flux1-dev.safetensors) for kind "dev" / "schnell"; "chroma": Chroma's (no per-block
    modulation, no time/vector/guidance embedders; a distilled_guidance_layer makes every modulation vector)."""
    mod = kind != "chroma"

    def qk(p: str) -> list[Spec]:
        return norm(f"{p}.query_norm", 128, bias=False, name="scale") + norm(
            f"{p}.key_norm", 128, bias=False, name="scale"
        )

    s = linear("img_in", h, 64)
    if mod:
        s += linear("time_in.in_layer", h, 256) + linear("time_in.out_layer", h, h)
        if kind == "dev":  # guidance distillation: the key whose presence makes the hosts set guidance_embed
            s += linear("guidance_in.in_layer", h, 256) + linear("guidance_in.out_layer", h, h)
        s += linear("vector_in.in_layer", h, 768) + linear("vector_in.out_layer", h, h)
    else:
        a = "distilled_guidance_layer"
        s += linear(f"{a}.in_proj", 5120, 64)
        for i in range(5):
            s += linear(f"{a}.layers.{i}.in_layer", 5120, 5120) + linear(f"{a}.layers.{i}.out_layer", 5120, 5120)
        for i in range(5):
            s += norm(f"{a}.norms.{i}", 5120, bias=False, name="scale")
        s += linear(f"{a}.out_proj", h, 5120)
    s += linear("txt_in", h, 4096)
    for i in range(double):
        for t in ("img", "txt"):
            p = f"double_blocks.{i}.{t}"
            s += (linear(f"{p}_mod.lin", 6 * h, h) if mod else []) + linear(f"{p}_attn.qkv", 3 * h, h)
            s += qk(f"{p}_attn.norm") + linear(f"{p}_attn.proj", h, h)
            s += linear(f"{p}_mlp.0", mlp, h) + linear(f"{p}_mlp.2", h, mlp)
    for i in range(single):
        p = f"single_blocks.{i}"
        s += linear(f"{p}.linear1", 7 * h, h) + linear(f"{p}.linear2", h, 5 * h) + qk(f"{p}.norm")
        s += linear(f"{p}.modulation.lin", 3 * h, h) if mod else []
    s += linear("final_layer.linear", 64, h)
    return s + (linear("final_layer.adaLN_modulation.1", 2 * h, h) if mod else [])


@dataclass(frozen=True)
class Part:
    """One component: its tensors (seeded by `name` and the key, so it is the same in every file) under `prefix`."""

    name: str
    prefix: str
    specs: Callable[[], list[Spec]]


FILES: dict[str, tuple[str, list[Part]]] = {  # file -> (folder, parts)
    "random-sd35.safetensors": (
        CKPT,
        [
            Part("mmdit", "model.diffusion_model.", mmdit),
            Part("ae16", "first_stage_model.", vae16),
            Part("clip_l", "text_encoders.clip_l.transformer.", lambda: clip_text(**CLIP_L)),
            Part("clip_g", "text_encoders.clip_g.transformer.", lambda: clip_text(**CLIP_G)),
            Part("t5xxl", "text_encoders.t5xxl.transformer.", t5_narrow),
        ],
    ),
    "random-flux.safetensors": (CKPT, [Part("flux-dev", "", lambda: flux("dev"))]),
    "random-flux-schnell.safetensors": (CKPT, [Part("flux-schnell", "", lambda: flux("schnell"))]),
    "random-chroma.safetensors": (CKPT, [Part("chroma", "", lambda: flux("chroma"))]),
    CLIP_FILE: (TE, [Part("clip_l", "", lambda: clip_text(**CLIP_L))]),
    T5_FILE: (TE, [Part("t5xxl", "", t5_narrow)]),
    AE_FILE: (VAE, [Part("ae16", "", vae16)]),
}


def request(ckpt: str, cfg: float, modules: list[str], distilled: float | None = None) -> dict:
    """txt2img fields (the caller adds prompt and seed). The checkpoint and modules go in override_settings,
    kept afterwards so that a second request does not reload the model."""
    r: dict = {
        "width": 256,
        "height": 256,
        "steps": 4,
        "cfg_scale": cfg,
        "sampler_name": "Euler",
        "scheduler": "Simple",
        "batch_size": 1,
        "n_iter": 1,
    }
    if distilled is not None:
        r["distilled_cfg_scale"] = distilled
    r["override_settings"] = {"sd_model_checkpoint": ckpt, "forge_additional_modules": modules}
    r["override_settings_restore_afterwards"] = False
    return r


FAMILIES: dict[str, dict] = {  # family -> checkpoint, additional modules, hosts, request
    "sd35": {
        "checkpoint": "random-sd35.safetensors",
        "modules": [],
        "hosts": ["forge", "ersatz"],
        "request": request("random-sd35.safetensors", 5.0, []),
    },
    "flux": {
        "checkpoint": "random-flux.safetensors",
        "modules": [CLIP_FILE, T5_FILE, AE_FILE],
        "hosts": ["ersatz"],
        "request": request("random-flux.safetensors", 1.0, [CLIP_FILE, T5_FILE, AE_FILE], distilled=3.5),
    },
    "flux-schnell": {
        "checkpoint": "random-flux-schnell.safetensors",
        "modules": [CLIP_FILE, T5_FILE, AE_FILE],
        "hosts": ["ersatz"],
        "request": request("random-flux-schnell.safetensors", 1.0, [CLIP_FILE, T5_FILE, AE_FILE]),
    },
    "chroma": {
        "checkpoint": "random-chroma.safetensors",
        "modules": [T5_FILE, AE_FILE],
        "hosts": ["ersatz"],
        "request": request("random-chroma.safetensors", 4.0, [T5_FILE, AE_FILE]),
    },
}


def manifest(families: Iterable[str]) -> dict:
    out = {}
    for fam in families:
        f = FAMILIES[fam]
        files = [{"file": n, "folder": FILES[n][0]} for n in [f["checkpoint"], *f["modules"]]]
        out[fam] = {
            "checkpoint": f["checkpoint"],
            "files": files,
            "hosts": list(f["hosts"]),
            "request": json.loads(json.dumps(f["request"])),
        }  # a copy the caller may edit
    return {"families": out}


def key_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") & (2**63 - 1)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """The fixed 2D sin-cos table an SD3 checkpoint stores as pos_embed: first half x, second half y."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ang = torch.arange(grid, dtype=torch.float64)[:, None] * omega[None]
    e = torch.cat([ang.sin(), ang.cos()], dim=1).to(torch.float16)  # [grid, dim / 2]
    out = torch.empty(grid, grid, dim, dtype=torch.float16)
    out[:, :, : dim // 2] = e[None, :, :]  # x (column) varies along the second axis
    out[:, :, dim // 2 :] = e[:, None, :]
    return out.reshape(1, grid * grid, dim)


def draw(seed: int, part: str, spec: Spec) -> torch.Tensor:
    key, shape, kind = spec
    if kind == "pos":
        return sincos_2d(math.isqrt(shape[1]), shape[2])
    g = torch.Generator().manual_seed(key_seed(seed, f"{part}:{key}"))
    x = torch.randn(shape, generator=g, dtype=torch.float32)
    if kind == "w":
        x.mul_(1.0 / math.sqrt(math.prod(shape[1:])))
    elif kind == "b":
        x.mul_(0.02)
    else:
        x.mul_(0.1).add_(1.0 if kind == "nw" else 0.0)
    return x.to(torch.float16)


def write_safetensors(
    path: str,
    tensors: list[tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]],
    metadata: dict[str, str] | None = None,
) -> None:
    """The safetensors format by hand (8-byte header length, JSON header, raw little-endian data), fp16 only:
    the header is known before any tensor is drawn, so each tensor is drawn, written and freed in turn (CLIP-G
    and the Flux files would not fit twice in memory), and nothing but the inputs decides the bytes."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    off = 0
    for key, shape, _ in tensors:
        n = 2 * math.prod(shape)
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data 8-byte aligned, as the safetensors library writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for key, shape, make in tensors:
            t = make().contiguous()
            assert t.dtype == torch.float16, key
            assert tuple(t.shape) == shape, key
            f.write(t.numpy().astype("<f2", copy=False).tobytes())  # no copy on a little-endian machine


def file_tensors(name: str, seed: int) -> list[tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]]:
    out = []
    for part in FILES[name][1]:
        for spec in part.specs():
            out.append((part.prefix + spec[0], spec[1], lambda p=part.name, s=spec: draw(seed, p, s)))
    keys = [k for k, _, _ in out]
    assert len(set(keys)) == len(keys), f"duplicate keys in {name}"
    return out


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of {', '.join(FAMILIES)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild files that exist")
    a = ap.parse_args()
    fams = [f.strip() for f in a.families.split(",") if f.strip()]
    bad = [f for f in fams if f not in FAMILIES]
    if bad:
        ap.error(f"unknown families {bad}; known: {list(FAMILIES)}")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    os.makedirs(a.out, exist_ok=True)
    man = manifest(fams)
    names = list(dict.fromkeys(e["file"] for f in man["families"].values() for e in f["files"]))
    for name in names:
        path = os.path.join(a.out, name)
        if os.path.exists(path) and not a.force:
            print(f"{name}: exists, kept", flush=True)
            continue
        t0 = time.time()
        tensors = file_tensors(name, a.seed)
        meta = {"generator": "sd-webui-seg tests/api/make_dit_models.py", "seed": str(a.seed)}
        write_safetensors(path + ".tmp", tensors, meta)
        os.replace(path + ".tmp", path)
        params = sum(math.prod(s) for _, s, _ in tensors)
        print(
            f"{name}: {len(tensors)} tensors, {params / 1e6:.1f}M params, {os.path.getsize(path) / 2**30:.2f} GiB,"
            f" {time.time() - t0:.0f}s",
            flush=True,
        )
    sums = sorted((n, sha256(os.path.join(a.out, n))) for n in os.listdir(a.out) if n.endswith(".safetensors"))
    with open(os.path.join(a.out, "SHA256SUMS"), "w") as f:
        f.writelines(f"{h}  {n}\n" for n, h in sums)
    with open(os.path.join(a.out, "manifest.json"), "w") as f:
        json.dump(man, f, indent=1)
        f.write("\n")
    for n, h in sums:
        print(f"{h}  {n}")


if __name__ == "__main__":
    main()
