"""Data-parallel training pieces: the process group, the per-rank data order, synced BN.

Started by ``torchrun`` (or ``cnnserve train --nproc-per-node N``, which runs torchrun's
engine), every rank runs the same training loop on its shard of each global batch:
:class:`torch.utils.data.DistributedSampler` deals a seeded permutation of the training set
round-robin to the ranks (``set_epoch`` reshuffles each epoch), each rank takes
``batch_size / world`` images per step, and DistributedDataParallel averages the gradients,
so a step sees the same images and takes the same update as one process with the whole
batch. Batch normalisation is synchronised: statistics over the global batch, as one
process computes them (:class:`CpuSyncBatchNorm` on CPU, where ``nn.SyncBatchNorm`` refuses
to run). Only rank 0 evaluates and writes checkpoints and reports.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

from cnnserve.common.errors import CnnserveError


@dataclass(frozen=True)
class Parallel:
    """Where this process stands: its rank of ``world`` (and of ``local_world`` on its node)."""

    rank: int = 0
    world: int = 1
    local_world: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 evaluates, keeps the best weights and writes every file."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one process takes part."""
        return self.world > 1


SINGLE = Parallel()


def from_environment(environ: dict[str, str] | None = None) -> Parallel:
    """The rank and world torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``)."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return SINGLE
    return Parallel(int(env.get("RANK", "0")), int(env["WORLD_SIZE"]),
                    int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])))


def start(parallel: Parallel) -> None:
    """Join the process group (gloo: the training loop runs on CPU)."""
    if parallel.active and not dist.is_initialized():
        dist.init_process_group("gloo")


def stop(parallel: Parallel) -> None:
    """Leave the process group."""
    if parallel.active and dist.is_initialized():
        dist.destroy_process_group()


def threads_per_rank(parallel: Parallel) -> int:
    """CPU cores of this node divided among its ranks (at least 1)."""
    return max(1, (os.cpu_count() or 1) // parallel.local_world)


def local_batch(batch_size: int, parallel: Parallel) -> int:
    """Images per rank per step; the global batch must divide evenly among the ranks."""
    if batch_size % parallel.world:
        raise CnnserveError(f"--batch-size {batch_size} (the global batch) must be divisible "
                            f"by the number of processes, {parallel.world}")
    return batch_size // parallel.world


def epoch_order(n: int, seed: int, epoch: int, parallel: Parallel) -> torch.Tensor:
    """This rank's training indices for ``epoch``: DistributedSampler's seeded deal."""
    indices: Any = range(n)  # a sized sequence is all the sampler reads of a dataset
    sampler: DistributedSampler[int] = DistributedSampler(
        indices, num_replicas=parallel.world, rank=parallel.rank, shuffle=True, seed=seed,
        drop_last=False)
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.int64)


def all_sum(values: list[float], parallel: Parallel) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (the values themselves when alone)."""
    if not parallel.active:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return [float(v) for v in tensor]


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch normalisation over the global batch of all ranks, on CPU tensors.

    Sums and squared sums are all-reduced with the differentiable
    ``torch.distributed.nn.functional.all_reduce``, so the backward pass reduces their
    gradients too, as ``nn.SyncBatchNorm`` does on GPUs. Its state_dict keys are those of
    ``nn.BatchNorm1d/2d``, so checkpoints load into the plain network.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        from torch.distributed.nn.functional import all_reduce

        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        count = torch.tensor([input.numel() / channels], dtype=input.dtype)
        with warnings.catch_warnings():  # its successor has no autograd for all_reduce yet
            warnings.simplefilter("ignore", FutureWarning)
            stats: torch.Tensor = all_reduce(  # type: ignore[no-untyped-call]
                torch.cat([input.sum(dims), (input * input).sum(dims), count]))
        n = stats[-1]
        mean = stats[:channels] / n
        var = (stats[channels:2 * channels] / n - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None \
                and self.running_var is not None and self.num_batches_tracked is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else \
                    1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach() * m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)) * m)
        shape = [1, channels] + [1] * (input.dim() - 2)
        out = (input - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        result: torch.Tensor = out
        return result


def convert_batch_norm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm1d/2d replaced by a :class:`CpuSyncBatchNorm` (same state)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and \
            not isinstance(module, CpuSyncBatchNorm):
        synced = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum,
                                  module.affine, module.track_running_stats)
        synced.load_state_dict(module.state_dict())
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        setattr(module, name, convert_batch_norm(child))
    return module


def wrap(model: nn.Module, parallel: Parallel) -> nn.Module:
    """The module the training steps call: DDP over ``model`` (BN synced) when parallel."""
    if not parallel.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(convert_batch_norm(model))


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another rank went away."""
    import torch.distributed as dist

    backend_error = getattr(dist, "DistBackendError", ())
    text = str(exc).lower()
    return (isinstance(exc, backend_error) or "connection closed" in text
            or "connection reset" in text or "broken pipe" in text or "gloo" in text)
