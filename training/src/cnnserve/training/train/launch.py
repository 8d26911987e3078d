"""``cnnserve train --nproc-per-node N``: start the ranks through torchrun's own engine.

:func:`launch` hands torchrun (:mod:`torch.distributed.run`) the same arguments a user would
type after ``torchrun``, with :mod:`cnnserve.training.distributed` as the module each rank
runs. One node uses a standalone rendezvous on the loopback interface (a free port); several
nodes meet at ``--master-addr:--master-port``. When any rank fails, torchrun stops the others
and this raises one :class:`CnnserveError` naming the rank and its exit status; the last
checkpoint, written atomically by rank 0 after each epoch, is left as it was.
"""

from __future__ import annotations

from pathlib import Path

from cnnserve.common.errors import CnnserveError
from cnnserve.training.train.config import LaunchOptions

ENTRY_MODULE = "cnnserve.training.distributed"


def torchrun_arguments(options: LaunchOptions, train_argv: list[str]) -> list[str]:
    """The torchrun command line (without ``torchrun``) that runs ``train_argv`` per rank."""
    assert options.nproc_per_node is not None
    args = ["--nproc-per-node", str(options.nproc_per_node), "--nnodes", str(options.nnodes)]
    if options.nnodes == 1 and options.master_addr is None:
        args.append("--standalone")
    else:
        args += ["--node-rank", str(options.node_rank),
                 "--master-addr", options.master_addr or "127.0.0.1",
                 "--master-port", str(options.master_port)]
    return [*args, "--module", ENTRY_MODULE, *train_argv]


def launch(options: LaunchOptions, train_argv: list[str], out: Path) -> int:
    """Run the job and wait for every local rank; 0 when all succeeded.

    Raises :class:`CnnserveError` when a rank fails (its own error is on stderr above).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(torchrun_arguments(options, train_argv))
    try:
        run(args)  # type: ignore[no-untyped-call]
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        checkpoint = out / "checkpoint.pt"
        resume = (f"the last checkpoint, {checkpoint}, is intact: continue with --resume "
                  f"{checkpoint}" if checkpoint.is_file() else "no checkpoint was written yet")
        raise CnnserveError(f"training failed on rank {rank} (exit status {failure.exitcode}); "
                            f"torchrun stopped the other ranks; {resume}") from None
    return 0
