"""Training binary networks: the `train` function behind the ``binax-train`` command.

>>> from binax.train import Config, train
>>> result = train(Config(model="mlp", dataset="digits", optimizer="bop", epochs=20))
>>> result.final["test_accuracy"]  # doctest: +SKIP

`train` is a short sequence of phases, a module each (`rundir`, `sharding`, `input_pipeline`,
`model`, `optim`, `step`), and runs on one CPU as on several GPUs, a TPU slice or several hosts
(see ``docs/training.md``). Needs the ``train`` extra: ``python -m pip install 'binax[train]'``.
"""

import importlib.util

#: Top-level module -> PyPI package of the ``train`` extra.
_EXTRA = {
    "orbax": "orbax-checkpoint",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "sklearn": "scikit-learn",
}
_absent = [pkg for module, pkg in _EXTRA.items() if importlib.util.find_spec(module) is None]
if _absent:
    raise ImportError(
        f"binax.train needs the 'train' extra, which is not installed (missing: "
        f"{', '.join(_absent)}). Install it with: python -m pip install 'binax[train]'"
    )

from binax.train.checkpoint import CheckpointError, Checkpoints, fingerprint  # noqa: E402
from binax.train.config import Config, ConfigError  # noqa: E402
from binax.train.loop import TrainingDiverged, TrainResult, restore, train  # noqa: E402
from binax.train.model import build_model  # noqa: E402
from binax.train.optim import (  # noqa: E402
    BINARY_DEFAULTS,
    OPTIMIZERS,
    REAL_OPTIMIZERS,
    RECIPES,
    Hyperparameter,
    Recipe,
    make_optimizer,
)
from binax.train.rundir import RunDirError, read_config  # noqa: E402
from binax.train.sharding import initialize_distributed, make_mesh, state_shardings  # noqa: E402
from binax.train.step import Program, TrainState, make_program  # noqa: E402

__all__ = [
    "BINARY_DEFAULTS",
    "OPTIMIZERS",
    "REAL_OPTIMIZERS",
    "RECIPES",
    "CheckpointError",
    "Checkpoints",
    "Config",
    "ConfigError",
    "Hyperparameter",
    "Program",
    "Recipe",
    "RunDirError",
    "TrainResult",
    "TrainState",
    "TrainingDiverged",
    "build_model",
    "fingerprint",
    "initialize_distributed",
    "make_mesh",
    "make_optimizer",
    "make_program",
    "read_config",
    "restore",
    "state_shardings",
    "train",
]
