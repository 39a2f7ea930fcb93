"""Blocks on separate processes: each rank runs its stage's slice of the generated training step.

:mod:`~localize.distributed.stages` splits the step graph per stage (send/recv where values cross
ranks), :mod:`~localize.distributed.ops` are the send/recv/all-reduce nodes it inserts,
:mod:`~localize.distributed.wire` carries the messages, :mod:`~localize.distributed.pipeline` is one
rank's runtime, :mod:`~localize.distributed.train` the public :func:`train`,
:mod:`~localize.distributed.batches` the data order and :mod:`~localize.distributed.launch` the
torchrun entry points.
"""

from localize.distributed.batches import iter_batches
from localize.distributed.launch import (
    is_main_process,
    load_local_model,
    main,
    main_from_cli,
    report_error,
    run_cli,
)
from localize.distributed.pipeline import DistributedResult
from localize.distributed.stages import Layout, StageProgram, split_step
from localize.distributed.train import load_checkpoint, model_state_dict, train
from localize.distributed.wire import PeerError

__all__ = [
    "DistributedResult",
    "Layout",
    "PeerError",
    "StageProgram",
    "is_main_process",
    "iter_batches",
    "load_checkpoint",
    "load_local_model",
    "main",
    "main_from_cli",
    "model_state_dict",
    "report_error",
    "run_cli",
    "split_step",
    "train",
]
