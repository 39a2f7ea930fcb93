"""Blocks on separate processes: each rank runs its stage's slice of the generated training step.

:mod:`~localize.distributed.stages` splits the step graph per stage (send/recv where values cross
ranks), :mod:`~localize.distributed.wire` carries the messages, :mod:`~localize.distributed.pipeline`
is one rank's runtime and :mod:`~localize.distributed.launch` the torchrun entry points.
"""

from localize.distributed.pipeline import (
    DistributedResult,
    PeerError,
    is_main_process,
    iter_batches,
    load_checkpoint,
    load_local_model,
    main,
    main_from_cli,
    model_state_dict,
    run_cli,
    train,
)
from localize.distributed.stages import Layout, StageProgram, split_step

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
    "run_cli",
    "split_step",
    "train",
]
