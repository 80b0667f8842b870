"""The block selector, against the stock SD1/SD2 and SDXL layouts."""

from __future__ import annotations

import pytest

from seg_lib.core.blocks import (
    SD1_LAYOUT,
    SDXL_LAYOUT,
    LayerRef,
    describe_layout,
    normalize_layers,
    parse_layers,
    resolve_layers,
)


def _refs(layers: str, layout=SD1_LAYOUT) -> list[tuple[str, int, int]]:
    return [(ref.part, ref.index, ref.transformer) for ref in resolve_layers(layers, layout)]


def test_default_middle_block():
    assert _refs("m0") == [("middle", 0, 0)]
    assert _refs("m0", SDXL_LAYOUT) == [("middle", 0, t) for t in range(10)]


def test_indices_count_blocks_with_self_attention():
    assert _refs("d0") == [("input", 1, 0)]
    assert _refs("d4") == [("input", 7, 0)]
    assert _refs("u0") == [("output", 3, 0)]
    assert _refs("u8") == [("output", 11, 0)]
    assert _refs("d0", SDXL_LAYOUT) == [("input", 4, 0), ("input", 4, 1)]
    assert _refs("u0.4", SDXL_LAYOUT) == [("output", 0, 4)]


def test_ranges_and_lists():
    assert _refs("d0-d3") == _refs("d0-3") == [("input", i, 0) for i in (1, 2, 4, 5)]
    assert _refs("d2.2-9", SDXL_LAYOUT) == [("input", 7, t) for t in range(2, 10)]
    assert _refs(" D1 , m0,u1-u2 ") == [("input", 2, 0), ("middle", 0, 0), ("output", 4, 0), ("output", 5, 0)]


def test_repeats_are_merged_and_sorted():
    assert _refs("u0, m0, m0, d0, u0") == [("input", 1, 0), ("middle", 0, 0), ("output", 3, 0)]


def test_refs_carry_the_depth_of_their_grid():
    depths = {(ref.part, ref.index): ref.depth for ref in resolve_layers("d0-d5,m0,u0-u8", SD1_LAYOUT)}
    assert depths[("input", 1)] == 0
    assert depths[("input", 7)] == 2
    assert depths[("middle", 0)] == 3
    assert depths[("output", 3)] == 2
    assert depths[("output", 11)] == 0
    assert {ref.depth for ref in resolve_layers("m0", SDXL_LAYOUT)} == {2}
    assert resolve_layers("d0.1", SDXL_LAYOUT) == (LayerRef("input", 4, 1, 1),)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "at least one block"),
        (" , ", "at least one block"),
        ("x1", "cannot read 'x1'"),
        ("d", "cannot read 'd'"),
        ("d1.", "cannot read 'd1.'"),
        ("m0;u1", "cannot read 'm0;u1'"),
        ("d3-d1", "ends before it starts"),
        ("u0.5-2", "ends before it starts"),
        ("d0-u3", "mixes block kinds"),
    ],
)
def test_syntax_errors_name_the_entry(text, message):
    with pytest.raises(ValueError, match="layers") as error:
        parse_layers(text)
    assert message in str(error.value)


def test_not_a_string():
    with pytest.raises(ValueError, match="layers"):
        parse_layers(3)  # type: ignore[arg-type]


def test_blocks_missing_from_the_model_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"'d6' is not in this model; valid: d0-d5 \(1 transformer each\)"):
        resolve_layers("d6", SD1_LAYOUT)
    with pytest.raises(ValueError, match=r"'m1' is not in this model.*m0 \(1 transformer\)"):
        resolve_layers("m1", SD1_LAYOUT)
    with pytest.raises(ValueError, match=r"'u0.4' asks for transformer 4, but u0 has 1"):
        resolve_layers("u0.4", SD1_LAYOUT)
    with pytest.raises(ValueError, match=r"'d0.0-2' asks for transformer 2, but d0 has 2.*d2:10"):
        resolve_layers("d0.0-2", SDXL_LAYOUT)
    assert _refs("d4", SD1_LAYOUT)  # but the same d4 exists on SD1 ...
    with pytest.raises(ValueError, match="'d4' is not in this model"):
        resolve_layers("d4", SDXL_LAYOUT)  # ... not on SDXL, which has four attention input blocks


def test_describe_layout():
    assert describe_layout(SD1_LAYOUT) == "d0-d5 (1 transformer each), m0 (1 transformer), u0-u8 (1 transformer each)"
    assert describe_layout(SDXL_LAYOUT) == (
        "d0-d3 (transformers d0:2 d1:2 d2:10 d3:10), m0 (10 transformers), "
        "u0-u5 (transformers u0:10 u1:10 u2:10 u3:2 u4:2 u5:2)"
    )


def test_normalized_text_parses_to_the_same_selection():
    for text in ["m0", " d0 - d3 , u0.4", "D2.2-9,m0", "u1-2.0-1", "d0-d0.3-3"]:
        canonical = normalize_layers(text)
        assert parse_layers(canonical) == parse_layers(text)
        assert normalize_layers(canonical) == canonical
    assert normalize_layers(" d0 - d3 , u0.4") == "d0-d3,u0.4"
    assert normalize_layers("d0-d0.3-3") == "d0.3"


def test_blocks_by_their_unet_index():
    # The naming of Forge's patcher and of the Forge/ComfyUI SEG extension's infotext (seg_block + id).
    assert _refs("input4", SDXL_LAYOUT) == [("input", 4, 0), ("input", 4, 1)]
    assert _refs("middle0") == _refs("m0")
    assert _refs("output1.2-3", SDXL_LAYOUT) == [("output", 1, 2), ("output", 1, 3)]
    assert normalize_layers(" Input4 , output1.2-3") == "input4,output1.2-3"
    with pytest.raises(ValueError, match="'input3' is not in this model"):
        resolve_layers("input3", SDXL_LAYOUT)
