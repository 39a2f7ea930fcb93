"""Fused kernels for localize's training loop: multi-tensor optimizer updates and cross-entropy.

Each op lives in its own file (a Triton kernel, its host launcher, the public function) with a plain
torch reference in :mod:`localize.kernels.reference`. Triton is optional: without it (and for CPU
tensors unless the Triton interpreter is on) every op runs through torch's own fused / foreach
implementations; :func:`backend` says which path runs.

Example::

    >>> import localize.kernels as K
    >>> K.backend() in K.BACKENDS
    True
"""

from localize.kernels._backend import BACKENDS, ENV_VAR, TRITON_AVAILABLE, backend, use_backend
from localize.kernels.adamw import adamw_step
from localize.kernels.cross_entropy_loss import CrossEntropyFunction, cross_entropy
from localize.kernels.ema import ema_update
from localize.kernels.sgd import sgd_step

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "TRITON_AVAILABLE",
    "CrossEntropyFunction",
    "adamw_step",
    "backend",
    "cross_entropy",
    "ema_update",
    "sgd_step",
    "use_backend",
]
