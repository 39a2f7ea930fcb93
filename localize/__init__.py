"""localize: supervised local learning for any PyTorch model.

``localize.transform(model, blocks=K, example_inputs=(x,))`` traces the model, cuts it into K
gradient-isolated blocks at legal, balanced cut points, generates an auxiliary head per block and
returns a :class:`LocalModel` whose ``train_step`` trains every block with its own local loss.
"""

from localize.compiler.tracer import Traced, trace
from localize.compiler.transform import transform
from localize.errors import LocalizeError
from localize.runtime.checkpoint import Checkpoint, load
from localize.runtime.model import Block, LocalModel
from localize.version import __version__

__all__ = [
    "Block",
    "Checkpoint",
    "LocalModel",
    "LocalizeError",
    "Traced",
    "load",
    "trace",
    "transform",
    "__version__",
]
