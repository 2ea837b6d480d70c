"""Training binary networks: the `train` function behind the ``binax-train`` command.

>>> from binax.train import Config, train
>>> result = train(Config(model="mlp", dataset="digits", optimizer="bop", epochs=20))
>>> result.final["test_accuracy"]  # doctest: +SKIP

The step is one `jax.jit` over a device mesh (data parallel, optionally splitting kernels over
a "model" axis); it runs unchanged on one CPU, several GPUs, a TPU slice or several hosts after
`initialize_distributed`. See ``docs/training.md``.
"""

from binax.train.checkpoint import CheckpointError, Checkpoints, fingerprint
from binax.train.config import Config, ConfigError
from binax.train.distributed import initialize_distributed
from binax.train.loop import RunDirError, TrainResult, train
from binax.train.optim import BINARY_DEFAULTS, OPTIMIZERS, REAL_OPTIMIZERS, make_optimizer
from binax.train.step import (
    Program,
    TrainState,
    build_model,
    make_mesh,
    make_program,
    state_shardings,
)

__all__ = [
    "BINARY_DEFAULTS",
    "OPTIMIZERS",
    "REAL_OPTIMIZERS",
    "CheckpointError",
    "Checkpoints",
    "Config",
    "ConfigError",
    "Program",
    "RunDirError",
    "TrainResult",
    "TrainState",
    "build_model",
    "fingerprint",
    "initialize_distributed",
    "make_mesh",
    "make_optimizer",
    "make_program",
    "state_shardings",
    "train",
]
