"""The architecture spec language: presets, parsing, error messages and shape arithmetic."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cnnserve.training.train.network import build_network, count_parameters, infer_shapes
from cnnserve.training.train.spec import (
    PRESETS,
    InputLayer,
    Layer,
    SpecError,
    format_spec,
    parse_spec,
    resolve_arch,
)


def _kinds(text: str) -> list[str]:
    return [layer.kind for layer in parse_spec(text)]


def test_lenet5_preset_is_the_classic_shape() -> None:
    layers = parse_spec(PRESETS["lenet5"])
    assert [str(x) for x in layers] == [
        "conv(6, 5)", "relu", "maxpool(2)", "conv(16, 5)", "relu", "maxpool(2)",
        "fc(120)", "relu", "fc(84)", "relu", "fc(10)"]
    shapes = [r.shape for r in infer_shapes(layers, (1, 28, 28), 10)]
    assert shapes[1] == (6, 24, 24) and shapes[3] == (6, 12, 12)
    assert shapes[4] == (16, 8, 8) and shapes[6] == (16, 4, 4) and shapes[-1] == (10,)
    model = build_network(layers, (1, 28, 28), 10)
    # 156 + 2416 + 30840 + 10164 + 850 weights and biases.
    assert count_parameters(model) == 44426


def test_fashion_cnn_preset_is_the_seed_network() -> None:
    layers = parse_spec(PRESETS["fashion-cnn"])
    assert _kinds(PRESETS["fashion-cnn"]) == ["conv", "bn", "relu", "maxpool", "conv", "bn",
                                             "relu", "maxpool", "fc"]
    rows = infer_shapes(layers, (1, 28, 28), 10)
    assert rows[1].shape == (16, 28, 28) and rows[8].shape == (32, 7, 7)
    model = build_network(layers, (1, 28, 28), 10)
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(32 * 7 * 7, 10)]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 2


def test_repetition_comments_aliases_and_round_trip() -> None:
    text = """
        input(3x32x32)                       # RGB
        -> [[conv(8, 3, pad=1) -> relu]*2 -> maxpool(2)]*2
        -> dropout(p=0.25) -> Linear(64) -> relu -> fc(10)
    """
    layers = parse_spec(text)
    assert isinstance(layers[0], InputLayer) and layers[0].shape == (3, 32, 32)
    assert _kinds(text)[1:11] == ["conv", "relu", "conv", "relu", "maxpool"] * 2
    assert parse_spec(format_spec(layers)) == layers
    assert Layer("conv", (("out", 8.0), ("k", 3.0), ("stride", 2.0), ("pad", 0.0))).__str__() \
        == "conv(8, 3, stride=2)"


@pytest.mark.parametrize(("spec", "fragment"), [
    ("convv(6, 5) -> fc(10)", "unknown layer 'convv'"),
    ("conv(6, 5) -> relu -> fc", "'fc' needs argument 'out'"),
    ("conv(6) -> fc(10)", "'conv' needs argument 'k'"),
    ("conv(6, 5, q=2) -> fc(10)", "'conv' has no argument 'q'"),
    ("conv(6, 5, 1, 0, 9) -> fc(10)", "at most 4 arguments"),
    ("conv(6.5, 5) -> fc(10)", "'out' must be a whole number"),
    ("conv(6 5) -> fc(10)", "expected ',' or ')'"),
    ("conv(6, 5) fc(10)", "expected '->' between layers at column 12: 'fc(10)'"),
    ("conv(6, 5) -> relu -> %", "unexpected character '%' at column 23"),
    ("[conv(8, 3) -> relu]*0 -> fc(10)", "positive whole number"),
    ("[conv(8, 3) -> fc(10)", "expected ']'"),
    ("fc(10) -> conv(3, 3) -> fc(10)", "'conv(3, 3)' cannot follow"),
    ("conv(8, 3) -> relu", "must end with fc(N), the classifier layer; it ends with 'relu'"),
    ("dropout(1.5) -> fc(10)", "dropout probability"),
    ("conv(8, 3) -> input -> fc(10)", "'input' may only be the first"),
    ("input(28x28) -> fc(10)", "CxHxW"),
    ("fc(10) ->", "expected a layer name"),
    ("   ", "empty"),
])
def test_bad_specs_name_the_bad_part(spec: str, fragment: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(spec)
    assert fragment in str(info.value)


@pytest.mark.parametrize(("size", "k", "stride", "pad"), [
    (28, 5, 1, 2), (28, 5, 1, 0), (28, 3, 2, 1), (32, 3, 1, 1), (9, 3, 3, 0), (7, 7, 1, 0),
    (27, 3, 2, 0), (30, 4, 2, 1)])
def test_conv_output_size_follows_the_formula(size: int, k: int, stride: int, pad: int) -> None:
    spec = f"conv(4, {k}, stride={stride}, pad={pad}) -> fc(3)"
    expected = (size - k + 2 * pad) // stride + 1
    rows = infer_shapes(parse_spec(spec), (2, size, size), 3)
    assert rows[1].shape == (4, expected, expected)
    model = build_network(parse_spec(spec), (2, size, size), 3)
    assert model[0](torch.zeros(1, 2, size, size)).shape == (1, 4, expected, expected)


def test_a_map_shrunk_below_1x1_is_rejected_with_every_size() -> None:
    with pytest.raises(SpecError) as info:
        infer_shapes(parse_spec(PRESETS["lenet5"]), (1, 8, 8), 10)
    message = str(info.value)
    assert "layer 4 'conv(16, 5)' shrinks the feature map below 1x1" in message
    assert "(2 - 5 + 2*0)/1 + 1 = -2" in message
    for row in ("input        1x8x8", "conv(6, 5)   6x4x4", "maxpool(2)   6x2x2"):
        assert row in message


def test_a_conv_that_skips_input_pixels_is_rejected() -> None:
    with pytest.raises(SpecError) as info:
        infer_shapes(parse_spec("conv(6, 5, stride=2) -> fc(10)"), (1, 28, 28), 10)
    assert "not a whole number: (28 - 5 + 2*0)/2 + 1 = 12.5" in str(info.value)
    assert "never reach the last 1 px" in str(info.value)
    # A fraction absorbed by padding loses no real pixel: (28 - 3 + 2)/2 + 1 = 14.5 -> 14.
    rows = infer_shapes(parse_spec("conv(6, 3, stride=2, pad=1) -> fc(10)"), (1, 28, 28), 10)
    assert rows[1].shape == (6, 14, 14)


def test_pooling_rounds_down_like_pytorch() -> None:
    rows = infer_shapes(parse_spec("maxpool(2) -> fc(3)"), (1, 7, 9), 3)
    assert rows[1].shape == (1, 3, 4)
    with pytest.raises(SpecError, match="padding 2 larger than half"):
        infer_shapes(parse_spec("maxpool(2, pad=2) -> fc(3)"), (1, 7, 9), 3)


def test_any_input_size_and_channel_count() -> None:
    layers = parse_spec("conv(8, 3, pad=1) -> bn -> relu -> avgpool(2) -> fc(16) -> bn -> fc(5)")
    model = build_network(layers, (3, 20, 30), 5).eval()
    assert model(torch.zeros(2, 3, 20, 30)).shape == (2, 5)
    assert isinstance(model[-2], torch.nn.BatchNorm1d)


def test_input_and_class_count_must_match_the_data() -> None:
    with pytest.raises(SpecError, match="input\\(3x28x28\\) but the images are 1x28x28"):
        infer_shapes(parse_spec("input(3x28x28) -> fc(10)"), (1, 28, 28), 10)
    with pytest.raises(SpecError, match="has 12 outputs but the dataset has 10 classes"):
        infer_shapes(parse_spec("conv(4, 3) -> fc(12)"), (1, 28, 28), 10)


def test_resolve_arch_accepts_presets_specs_and_files(tmp_path: Path) -> None:
    assert resolve_arch("lenet5") == ("lenet5", PRESETS["lenet5"])
    assert resolve_arch("conv(4, 3) -> fc(10)") == ("custom", "conv(4, 3) -> fc(10)")
    (tmp_path / "tiny.spec").write_text("# a tiny net\nconv(4, 3) -> relu\n-> fc(10)\n")
    name, text = resolve_arch(f"@{tmp_path / 'tiny.spec'}")
    assert name == "tiny" and len(parse_spec(text)) == 3
    with pytest.raises(SpecError, match=r"unknown architecture 'lenet6'.*lenet5, fashion-cnn"):
        resolve_arch("lenet6")
    with pytest.raises(SpecError, match="cannot read architecture file"):
        resolve_arch(f"@{tmp_path / 'missing.spec'}")
