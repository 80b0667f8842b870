"""tests/api/make_dit_models.py: the manifest's shape, the key layouts the hosts detect, the hand-written
safetensors files (read back by the safetensors library) and their byte reproducibility, on tiny stand-in parts."""

from __future__ import annotations

import hashlib
import json
import sys

import pytest

pytest.importorskip("safetensors")

from safetensors.torch import load_file

from tests.api import make_dit_models as m

REQUEST_KEYS = {"width", "height", "cfg_scale", "sampler_name", "scheduler", "steps", "override_settings"}


def shapes(specs: list[m.Spec]) -> dict[str, tuple[int, ...]]:
    return {k: s for k, s, _ in specs}


def test_manifest_shape():
    man = m.manifest(m.FAMILIES)
    assert set(man) == {"families"}
    assert list(man["families"]) == ["sd35", "flux", "flux-schnell", "chroma"]
    for fam, f in man["families"].items():
        assert set(f) == {"checkpoint", "files", "hosts", "request"}, fam
        assert f["files"][0] == {"file": f["checkpoint"], "folder": "models/Stable-diffusion"}
        for e in f["files"]:
            assert set(e) == {"file", "folder"}
            assert e["folder"] in ("models/Stable-diffusion", "models/text_encoder", "models/VAE")
            assert e["file"] in m.FILES
            assert m.FILES[e["file"]][0] == e["folder"]
        assert f["hosts"]
        assert set(f["hosts"]) <= {"forge", "ersatz"}
        r = f["request"]
        assert set(r) >= REQUEST_KEYS, fam
        assert (r["width"], r["height"], r["steps"]) == (256, 256, 4)
        assert r["override_settings"]["sd_model_checkpoint"] == f["checkpoint"]
        assert r["override_settings"]["forge_additional_modules"] == [e["file"] for e in f["files"][1:]]
        assert "prompt" not in r
        assert "seed" not in r
    assert man["families"]["sd35"]["hosts"] == ["forge", "ersatz"]  # Forge main fixes Flux/Chroma at full size
    assert man["families"]["flux"]["request"]["distilled_cfg_scale"] == 3.5
    assert "distilled_cfg_scale" not in man["families"]["chroma"]["request"]
    json.dumps(man)


def test_layouts_as_the_hosts_detect_them():
    sd3 = shapes(m.mmdit())
    assert sd3["x_embedder.proj.weight"][0] // 64 == 10  # depth from the width
    assert "joint_blocks.9.x_block.attn.qkv.weight" in sd3
    assert sd3["pos_embed"] == (1, 384 * 384, 640)  # pos_embed_max_size 384: Medium's attn2 layers
    assert "joint_blocks.9.x_block.attn2.qkv.weight" in sd3
    assert "joint_blocks.9.context_block.mlp.fc1.weight" not in sd3  # pre_only
    assert sd3["context_embedder.weight"] == (640, 4096)
    assert sd3["y_embedder.mlp.0.weight"] == (640, 2048)
    dev, schnell, chroma = (shapes(m.flux(k)) for k in ("dev", "schnell", "chroma"))
    assert "guidance_in.in_layer.weight" in dev
    assert "guidance_in.in_layer.weight" not in schnell
    assert "distilled_guidance_layer.layers.0.in_layer.bias" in chroma
    assert "vector_in.in_layer.weight" not in chroma
    for sd in (dev, schnell, chroma):
        assert sd["img_in.weight"] == (3072, 64)
        assert sd["txt_in.weight"] == (3072, 4096)
        assert sd["double_blocks.0.img_attn.norm.key_norm.scale"] == (128,)
        assert sd["single_blocks.0.linear1.weight"] == (3 * 3072 + 12288, 3072)
    t5 = shapes(m.t5_narrow())
    assert t5["encoder.block.0.layer.0.SelfAttention.k.weight"][0] not in (384, 768, 1024, 2048)  # ersatz: distilled
    assert t5["shared.weight"] == (32128, 4096)
    assert shapes(m.vae16())["decoder.conv_in.weight"] == (512, 16, 3, 3)
    clip_g = shapes(m.clip_text(**m.CLIP_G))
    assert clip_g["text_model.encoder.layers.0.layer_norm1.bias"] == (1280,)
    assert "text_model.encoder.layers.31.mlp.fc2.weight" in clip_g


def test_draw_init():
    w = m.draw(0, "p", ("a.weight", (256, 1024), "w")).float()
    assert abs(w.std().item() - 1 / 32) < 2e-3
    n = m.draw(0, "p", ("n.weight", (4096,), "nw")).float()
    assert abs(n.mean().item() - 1) < 0.01
    assert abs(n.std().item() - 0.1) < 0.01
    assert m.draw(0, "p", ("a.weight", (8, 8), "w")).equal(m.draw(0, "p", ("a.weight", (8, 8), "w")))
    assert not m.draw(1, "p", ("a.weight", (8, 8), "w")).equal(m.draw(0, "p", ("a.weight", (8, 8), "w")))
    pos = m.sincos_2d(4, 8).float()
    assert pos.shape == (1, 16, 8)
    assert pos.abs().max() <= 1


def tiny(name: str) -> list[m.Spec]:  # a few tensors of every init kind, distinct per file
    return [
        (f"{name}.weight", (4, 3, 2, 2), "w"),
        (f"{name}.bias", (4,), "b"),
        ("norm.weight", (5,), "nw"),
        ("norm.bias", (5,), "nb"),
        ("pos_embed", (1, 4, 8), "pos"),
    ]


def test_main_writes_loadable_reproducible_files(tmp_path, monkeypatch):
    files = {n: (folder, [m.Part(n, "pre.", lambda n=n: tiny(n))]) for n, (folder, _) in m.FILES.items()}
    monkeypatch.setattr(m, "FILES", files)
    sums = []
    for out in (tmp_path / "a", tmp_path / "b"):
        monkeypatch.setattr(sys, "argv", ["make_dit_models.py", "--out", str(out), "--families", "flux,chroma"])
        m.main()
        man = json.loads((out / "manifest.json").read_text())
        assert man == m.manifest(["flux", "chroma"])
        names = sorted(p.name for p in out.glob("*.safetensors"))
        assert names == sorted({e["file"] for f in man["families"].values() for e in f["files"]})
        sums.append((out / "SHA256SUMS").read_text())
        for n in names:
            sd = load_file(str(out / n))
            assert sorted(sd) == sorted(f"pre.{k}" for k, _, _ in tiny(n))
            for k, s, _ in tiny(n):
                assert tuple(sd[f"pre.{k}"].shape) == s
            assert sd[f"pre.{n}.weight"].equal(m.draw(0, n, (f"{n}.weight", (4, 3, 2, 2), "w")))
            assert hashlib.sha256((out / n).read_bytes()).hexdigest() in sums[-1]
    assert sums[0] == sums[1]
