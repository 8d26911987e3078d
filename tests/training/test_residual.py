"""Residual blocks and global average pooling in the spec language, ResNet presets, RGB runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from cnnserve.training.export.exporter import export_checkpoint
from cnnserve.training.train.checkpoint import load_checkpoint, save_checkpoint
from cnnserve.training.train.data import augment_batch
from cnnserve.training.train.network import build_network, count_parameters, infer_shapes
from cnnserve.training.train.spec import PRESETS, SpecError, format_spec, parse_spec
from cnnserve.training.train.trainer import TrainConfig, augment_policy, resume_config, train
from tests.support.export import make_checkpoint

SMALL_RESNET = ("conv(8, 3, pad=1) -> bn -> relu -> res(8) -> res(16, stride=2) "
                "-> res(16, stride=2) -> gap -> fc(10)")


def test_residual_output_shapes_follow_strides_and_widths() -> None:
    layers = parse_spec("res(8) -> res(16, stride=2) -> res(16, stride=2) -> res(24) -> gap"
                        " -> fc(3)")
    rows = infer_shapes(layers, (3, 17, 17), 3)
    assert [r.text for r in rows] == ["3x17x17", "8x17x17", "16x9x9", "16x5x5", "24x5x5",
                                      "24", "3"]
    net = build_network(layers, (3, 17, 17), 3)
    assert net(torch.zeros(2, 3, 17, 17)).shape == (2, 3)
    # A projection shortcut only where the shape changes (channels or stride).
    blocks = [m for m in net if type(m).__name__ == "ResidualBlock"]
    assert [type(b.shortcut).__name__ for b in blocks] == ["Sequential"] * 4
    same = build_network(parse_spec("conv(4, 3, pad=1) -> res(4) -> gap -> fc(2)"),
                         (1, 6, 6), 2)
    assert type(same[1].shortcut).__name__ == "Identity"


def test_spec_text_round_trips_and_structure_is_checked() -> None:
    layers = parse_spec(SMALL_RESNET)
    assert parse_spec(format_spec(layers)) == layers
    assert "res(16, stride=2)" in format_spec(layers)
    with pytest.raises(SpecError, match="cannot follow"):
        parse_spec("gap -> res(8) -> fc(2)")
    with pytest.raises(SpecError, match="has 3 outputs but the dataset has 2 classes"):
        infer_shapes(parse_spec("res(4, stride=2) -> gap -> fc(3)"), (1, 4, 4), 2)


def test_resnet_presets_have_the_papers_size() -> None:
    resnet20 = build_network(parse_spec(PRESETS["resnet20"]), (3, 32, 32), 10)
    # He et al.: 0.27 M parameters (with identity-padding shortcuts; projections add 2.7 k).
    assert 0.265e6 < count_parameters(resnet20) < 0.275e6
    convs = [m for m in resnet20.modules() if isinstance(m, torch.nn.Conv2d)
             and m.kernel_size == (3, 3)]
    assert len(convs) + 1 == 20  # 19 3x3 convolutions + the fc layer
    resnet8 = build_network(parse_spec(PRESETS["resnet8"]), (3, 32, 32), 10)
    assert 0.07e6 < count_parameters(resnet8) < 0.09e6


@pytest.mark.slow
def test_a_residual_network_exports_with_onnx_parity_at_several_batch_sizes(
        tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "r.pt", dataset="synthetic:3x16x16", epochs=1,
                           spec=SMALL_RESNET)
    result = export_checkpoint(ckpt, tmp_path / "repo", "res", max_batch_size=100)
    assert {1, 7, 64, 100} <= {row.batch_size for row in result.parity.rows}
    assert not result.parity.failures(exact_argmax=True)
    assert result.config.inputs[0].shape == (-1, 3, 16, 16)


def test_rgb_augmentation_is_deterministic_per_seed_and_keeps_pixels_in_range() -> None:
    x = torch.randn(16, 3, 8, 8)
    stats = (torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.2, 0.2]))
    background = -stats[0] / stats[1]

    def run(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return augment_batch(x, background, True, gen, 2, jitter=0.3, stats=stats)

    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))
    pixels = run(1) * stats[1].view(1, 3, 1, 1) + stats[0].view(1, 3, 1, 1)
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    assert augment_policy("cifar10:/data", (3, 32, 32)) == (4, True)
    assert augment_policy("folder:3x64x64:/d", (3, 64, 64)) == (8, True)
    assert augment_policy("folder:1x64x64:/d", (1, 64, 64)) == (4, False)


def test_a_residual_rgb_run_resumes_mid_run_to_the_same_weights(tmp_path: Path) -> None:
    config = TrainConfig(dataset="synthetic:3x8x8", arch="conv(4, 3, pad=1) -> bn -> relu -> "
                         "res(8, stride=2) -> gap -> fc(10)", epochs=2, batch_size=64, lr=3e-3,
                         color_jitter=0.2)
    straight = train(config)
    saved = tmp_path / "checkpoint.pt"

    def stop_after_one(ckpt: object) -> None:
        save_checkpoint(ckpt, saved)  # type: ignore[arg-type]
        if ckpt.train_state["epoch"] == 1:  # type: ignore[attr-defined]
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, on_epoch=stop_after_one)
    partial = load_checkpoint(saved)
    assert resume_config(partial, None) == config
    resumed = train(dataclasses.replace(config), resume=partial)
    assert [h.epoch for h in resumed.history] == [1, 2]
    for k, v in straight.checkpoint.state_dict.items():
        torch.testing.assert_close(resumed.checkpoint.state_dict[k], v)


def test_a_preset_fits_a_dataset_with_another_number_of_classes() -> None:
    from cnnserve.common.data.datasets import Dataset, ImageSet, load_dataset

    full = load_dataset("synthetic:1x16x16")

    def three(s: ImageSet) -> ImageSet:
        keep = s.labels < 3
        return ImageSet(s.images[keep], s.labels[keep])

    data = Dataset("three", full.class_names[:3], three(full.train), three(full.val),
                   three(full.test))
    result = train(TrainConfig(arch="resnet8", epochs=1, batch_size=64), dataset=data)
    assert result.checkpoint.spec.endswith("gap -> fc(3)")
    assert result.checkpoint.class_names == full.class_names[:3]
