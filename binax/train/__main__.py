"""``python -m binax.train``: the same as ``binax-train``."""

from binax.train.cli import run

run()
