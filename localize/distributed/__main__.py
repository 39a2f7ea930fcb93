"""``python -m localize.distributed MODEL.py --blocks K ...``: one rank of a pipeline, under torchrun."""

import os
import sys

from localize.distributed import main

code = main()
sys.stdout.flush()
sys.stderr.flush()
# After a peer died, process-group teardown at interpreter exit can block: leave at once.
os._exit(code)
