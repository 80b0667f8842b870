"""Make the README's pictures from a running WebUI, in the system Chromium, with the UI tier's helpers.

    python tests/ui/make_pictures.py --url http://127.0.0.1:7860 --name a1111 [--xyz] [--out docs/images]

writes ``accordion-<name>.png`` (the SEG accordion, open and ticked, with a hires fix override showing),
``result-<name>.png`` (the image and its infotext under it) and, with ``--xyz``, ``xyz-sigma.png`` (an
XYZ grid over ``[SEG] Blur sigma``). Each PNG is cropped to its element and quantized to stay small.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.ui.conftest import fresh_browser  # noqa: E402
from tests.ui.webui import WebUI, gradio_major  # noqa: E402

MAX_BYTES = 150_000


def save_small(png: bytes, path: Path, colors: int = 128) -> int:
    """Quantize to a palette (screenshots have few colours), shrinking until under MAX_BYTES."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    while True:
        small = image.quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
        buffer = io.BytesIO()
        small.save(buffer, format="PNG", optimize=True)
        if buffer.tell() <= MAX_BYTES or image.width < 300:
            path.write_bytes(buffer.getvalue())
            return buffer.tell()
        image = image.resize((image.width * 4 // 5, image.height * 4 // 5), Image.Resampling.LANCZOS)


def accordion(ui: WebUI, out: Path, name: str, size: int, steps: int) -> None:
    tab = "txt2img"
    ui.small_image(tab, size, steps)
    ui.enable_seg(tab)
    ui.set_number(ui.seg_id(tab, "scale"), 3, "the SEG scale slider")
    ui.set_dropdown(ui.seg_id(tab, "blur_sigma"), "inf", "the SEG blur sigma box")
    element = ui.seg(tab, "enabled")
    ui.page.mouse.move(0, 0)
    print(out / f"accordion-{name}.png", save_small(element.screenshot(), out / f"accordion-{name}.png"))
    ui.generate(tab)
    ui.page.mouse.move(0, 0)
    results = ui.find(f"#{tab}_results", "the txt2img results panel")
    print(out / f"result-{name}.png", save_small(results.screenshot(), out / f"result-{name}.png"))


def xyz(ui: WebUI, out: Path, size: int, steps: int) -> None:
    tab = "txt2img"
    ui.small_image(tab, size, steps)
    ui.choose_script(tab, "X/Y/Z plot")
    ui.set_dropdown(f"script_{tab}_xyz_plot_x_type", "[SEG] Blur sigma", "the X type dropdown")
    ui.set_text(f"script_{tab}_xyz_plot_x_values", "1, 4, 16, inf", "the X values box")
    ui.generate(tab)
    grid = ui.find(f"#{tab}_gallery img", "the grid image")
    source = grid.get_attribute("src") or ""
    png = ui.page.request.get(source if source.startswith("http") else ui.url + source).body()
    print(out / "xyz-sigma.png", save_small(png, out / "xyz-sigma.png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:7860")
    parser.add_argument("--name", required=True, help="the WebUI's name in the file names (a1111, forge, ...)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--xyz", action="store_true", help="also the XYZ grid over [SEG] Blur sigma")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    url = args.url.rstrip("/")
    shots = Path(tempfile.mkdtemp(prefix="seg-pictures-shots-"))
    with fresh_browser(width=1280) as context:
        page = context.new_page()
        ui = WebUI(page, url, shots, "pictures", gradio_major(url))
        ui.open()
        accordion(ui, args.out, args.name, args.size, args.steps)
        if args.xyz:
            ui.open()  # a fresh page: the accordion's settings stay out of the grid
            xyz(ui, args.out, args.size, args.steps)


if __name__ == "__main__":
    main()
