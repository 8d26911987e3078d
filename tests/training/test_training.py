"""The training loop on small data: it learns, is reproducible, resumes, and keeps the best."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnserve.common.data.datasets import load_dataset
from cnnserve.common.errors import CnnserveError
from cnnserve.common.preprocess import channel_stats
from cnnserve.training.train.checkpoint import CheckpointError, restore_network, save_checkpoint
from cnnserve.training.train.data import augment_batch, to_tensor
from cnnserve.training.train.trainer import (
    EpochStats,
    TrainConfig,
    _Best,
    resume_config,
    train,
)

# A small network for the 8x8 digits: a fraction of a second per epoch.
DIGITS_NET = "conv(8, 3, pad=1) -> bn -> relu -> maxpool(2) -> fc(32) -> relu -> fc(10)"


def _digits(**kw: object) -> TrainConfig:
    return dataclasses.replace(TrainConfig(dataset="digits", arch=DIGITS_NET, epochs=3,
                                           batch_size=32, lr=3e-3, augment=False), **kw)


def test_short_run_learns() -> None:
    result = train(_digits(epochs=4))
    losses = [h.train_loss for h in result.history]
    assert losses[-1] < losses[0] * 0.5, losses
    assert result.history[-1].val_loss < result.history[0].val_loss
    test_acc = result.checkpoint.metrics["test_accuracy"]
    assert test_acc > 0.8 and len(result.test_predictions) == 360
    assert result.checkpoint.metrics["epochs"] == 4


def test_default_recipe_is_the_measured_one() -> None:
    config = TrainConfig()
    assert (config.dataset, config.arch, config.optimizer, config.schedule) == (
        "fashion-mnist", "fashion-cnn", "adam", "cosine")
    assert (config.epochs, config.batch_size, config.lr, config.augment) == (24, 128, 1e-3, True)


def test_fashion_cnn_on_synthetic_learns_in_one_epoch() -> None:
    result = train(TrainConfig(dataset="synthetic", epochs=1, batch_size=32))
    assert result.checkpoint.metrics["test_accuracy"] > 0.9
    assert result.checkpoint.spec.startswith("conv(16, 5, pad=2) -> bn")


def test_normalisation_comes_from_the_training_split_only() -> None:
    ds = load_dataset("digits", seed=0)
    ckpt = train(_digits(epochs=1), dataset=ds).checkpoint
    assert (ckpt.mean, ckpt.std) == channel_stats(ds.train.images)
    everything = np.concatenate([ds.train.images, ds.val.images, ds.test.images])
    assert ckpt.mean != channel_stats(everything)[0]


def test_same_seed_same_model_other_seed_other_model() -> None:
    a = train(_digits(epochs=2)).checkpoint.state_dict
    b = train(_digits(epochs=2)).checkpoint.state_dict
    c = train(_digits(epochs=2, seed=1)).checkpoint.state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_an_interrupted_run_resumes_to_the_same_result(tmp_path: Path) -> None:
    config = _digits(epochs=3, augment=True)
    straight = train(config)
    saved = tmp_path / "checkpoint.pt"

    def stop_after_two(ckpt: object) -> None:
        save_checkpoint(ckpt, saved)  # type: ignore[arg-type]
        if len(straight.history) and ckpt.train_state["epoch"] == 2:  # type: ignore[attr-defined]
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, on_epoch=stop_after_two)
    from cnnserve.training.train.checkpoint import load_checkpoint

    partial = load_checkpoint(saved)
    assert resume_config(partial, None) == config
    resumed = train(config, resume=partial)
    assert [h.epoch for h in resumed.history] == [1, 2, 3]
    for k, v in straight.checkpoint.state_dict.items():
        torch.testing.assert_close(resumed.checkpoint.state_dict[k], v)
    assert resumed.best_epoch == straight.best_epoch


def test_resuming_a_finished_cosine_run_replans_the_schedule() -> None:
    config = _digits(epochs=2)
    first = train(config)
    longer = train(dataclasses.replace(config, epochs=4), resume=first.checkpoint)
    # Epochs 1-2 ran on the 2-epoch plan (1, 1/2 of the base rate); epochs 3-4 follow the
    # 4-epoch plan from where it stands: (1 + cos(2pi/4))/2 = 1/2, (1 + cos(3pi/4))/2.
    assert [h.lr for h in longer.history] == pytest.approx(
        [3e-3, 1.5e-3, 1.5e-3, 3e-3 * 0.1464466], rel=1e-5)
    assert longer.history[:2] == first.history


def test_resume_needs_training_state() -> None:
    ckpt = dataclasses.replace(train(_digits(epochs=1)).checkpoint, train_state=None)
    with pytest.raises(CheckpointError, match="no training state"):
        resume_config(ckpt, None)


def test_best_epoch_weights_are_kept() -> None:
    model = torch.nn.Linear(1, 1)
    best = _Best()

    def stats(epoch: int, acc: float, loss: float) -> EpochStats:
        return EpochStats(epoch, 0.0, 0.0, loss, acc, 0.1, 1.0)

    assert best.offer(stats(1, 0.8, 0.5), model)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.fill_(42.0)
    assert not best.offer(stats(2, 0.7, 0.3), model)       # worse accuracy
    assert not best.offer(stats(3, 0.8, 0.6), model)       # same accuracy, higher loss
    assert best.epoch == 1 and torch.equal(best.weights["weight"], first["weight"])
    assert best.offer(stats(4, 0.8, 0.4), model)           # same accuracy, lower loss
    assert best.epoch == 4


def test_checkpoint_holds_the_best_epoch_and_predicts_like_training() -> None:
    result = train(_digits(epochs=3))
    best = max(result.history, key=lambda h: (h.val_accuracy, -h.val_loss))
    assert result.best_epoch == best.epoch
    ckpt = result.checkpoint
    ds = load_dataset("digits")
    with torch.no_grad():
        logits = restore_network(ckpt)(to_tensor(ds.test.images, ckpt.mean, ckpt.std))
    np.testing.assert_array_equal(logits.argmax(1).numpy(), result.test_predictions)


def test_sgd_with_step_schedule() -> None:
    result = train(_digits(epochs=4, optimizer="sgd", lr=0.05, schedule="step", step_size=2,
                           gamma=0.5))
    assert [h.lr for h in result.history] == pytest.approx([0.05, 0.05, 0.025, 0.025])


def test_cosine_schedule_decays_to_zero() -> None:
    lrs = [h.lr for h in train(_digits(epochs=4)).history]
    assert lrs[0] == pytest.approx(3e-3) and lrs == sorted(lrs, reverse=True)


def test_spec_that_does_not_fit_fails_before_training() -> None:
    from cnnserve.training.train.spec import SpecError

    with pytest.raises(SpecError, match="below 1x1"):
        train(_digits(arch="lenet5"))


@pytest.mark.parametrize(("field", "value"), [("epochs", 0), ("lr", 0.0), ("batch_size", 0),
                                              ("schedule", "linear"), ("val_fraction", 1.0)])
def test_bad_recipe_values_are_refused(field: str, value: object) -> None:
    with pytest.raises(CnnserveError, match=field.replace("_", "-")):
        _digits(**{field: value})


def test_augment_shifts_and_flips_within_bounds() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).reshape(2, 1, 5, 5)
    background = torch.tensor([-1.0])
    out = augment_batch(x, background, flip=False, generator=gen, shift=1)
    assert out.shape == x.shape
    for i in range(2):
        # Every output pixel is either the background or a pixel of the same image.
        values = set(out[i].flatten().tolist()) - {-1.0}
        assert values <= set(x[i].flatten().tolist())
        assert len(values) >= 16  # a shift of 1 px keeps at least a 4x4 block
    same = augment_batch(x, background, flip=False, generator=gen, shift=0)
    assert torch.equal(same, x)
    flipped = [augment_batch(x[:1], background, flip=True, generator=gen, shift=0)
               for _ in range(20)]
    assert any(torch.equal(f, x[:1].flip(-1)) for f in flipped)
    assert any(torch.equal(f, x[:1]) for f in flipped)
