import pytest

import ssiu
from ssiu import SSIUConfig


def test_defaults_are_the_released_model():
    c = SSIUConfig()
    assert (c.scale, c.channels, c.steps, c.heads, c.block, c.halo) == (4, 64, 9, 4, 8, 1)
    assert c.attn_topk is None and c.moe_topk == 3
    assert c.window == 10 and c.keys_per_block == 100 and c.head_dim == 16
    assert c.dense_attention


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("scale", 5, "scale"),
        ("scale", 2.0, "int"),
        ("channels", 0, "channels"),
        ("steps", 2, "at least 3"),
        ("heads", 3, "divide"),
        ("heads", 64, "even"),
        ("block", 0, "block"),
        ("halo", -1, "halo"),
        ("attn_topk", 0, ">= 1"),
        ("attn_topk", 2.5, "int"),
        ("attn_topk", True, "int"),
        ("moe_topk", 0, "1, 2 or 3"),
        ("moe_topk", 4, "1, 2 or 3"),
    ],
)
def test_invalid_values_say_which_and_why(field, value, words):
    with pytest.raises(ValueError, match=words) as err:
        SSIUConfig(**{field: value})
    assert f"SSIUConfig.{field}=" in str(err.value)


def test_dict_round_trip_and_unknown_fields():
    c = SSIUConfig(scale=2, attn_topk=16, moe_topk=1)
    assert SSIUConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown"):
        SSIUConfig.from_dict({"scale": 2, "colour": 1})


def test_build_passes_options_and_rejects_unknown():
    m = ssiu.build(3, channels=16, heads=2, steps=3)
    assert m.config == SSIUConfig(scale=3, channels=16, heads=2, steps=3)
    with pytest.raises(TypeError):
        ssiu.build(4, colour=1)
    with pytest.raises(ValueError, match="scale"):
        ssiu.build(8)


def test_large_topk_is_dense():
    assert SSIUConfig(attn_topk=100).dense_attention
    assert SSIUConfig(attn_topk=500).dense_attention
    assert not SSIUConfig(attn_topk=99).dense_attention
