"""``python -m localize MODEL.py --blocks K ...``: the same as the ``localize`` command."""

import sys

from localize.cli.main import main

sys.exit(main())
