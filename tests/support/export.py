"""Tiny checkpoints for the export tests, trained for a fraction of a second on ``synthetic``."""

from __future__ import annotations

from pathlib import Path

import torch

from cnnserve.common.data.datasets import load_dataset
from cnnserve.common.preprocess import channel_stats, normalize
from cnnserve.training.train.checkpoint import Checkpoint, save_checkpoint
from cnnserve.training.train.network import build_network
from cnnserve.training.train.spec import parse_spec

#: Small but complete: padding, batch norm (folded by the exporter), pooling, two fc layers.
TINY_SPEC = ("conv(4, 3, pad=1) -> bn -> relu -> maxpool(2) -> conv(8, 3) -> relu -> maxpool(2)"
             " -> fc(32) -> relu -> fc(10)")


def make_checkpoint(path: Path, *, dataset: str = "synthetic", epochs: int = 3,
                    spec: str = TINY_SPEC, seed: int = 0) -> Path:
    """Train ``spec`` on ``dataset`` for ``epochs`` (Adam, batch 64) and save a checkpoint."""
    data = load_dataset(dataset)
    mean, std = channel_stats(data.train.images)
    torch.manual_seed(seed)
    net = build_network(parse_spec(spec), data.input_shape, len(data.class_names))
    x = torch.from_numpy(normalize(data.train.images, mean, std))
    y = torch.from_numpy(data.train.labels)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    for _ in range(epochs):
        for i in range(0, len(x), 64):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x[i:i + 64]), y[i:i + 64])
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
    net.eval()
    ckpt = Checkpoint(spec=spec, input_shape=data.input_shape, class_names=data.class_names,
                      mean=mean, std=std, dataset=dataset,
                      metrics={"test_accuracy": 0.0, "epochs": epochs},
                      state_dict=net.state_dict())
    save_checkpoint(ckpt, path)
    return path
