"""``torchrun ... -m cnnserve.training.distributed [train flags]``: one rank of a training run.

The same flags as ``cnnserve train`` (less the launcher's ``--nproc-per-node`` family);
torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` ...)
place the process in the job. ``cnnserve train --nproc-per-node N`` starts these processes
through torchrun's own engine (:mod:`torch.distributed.run`). Example::

    torchrun --standalone --nproc-per-node 2 -m cnnserve.training.distributed \\
        --dataset cifar10 --arch resnet20 --batch-size 128 --out runs/r20
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cnnserve train`` with ``argv`` as this rank; the exit status."""
    from cnnserve.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
