"""``python -m binax.train``: the same as ``binax-train``."""

import sys

from binax.train.cli import main

sys.exit(main())
