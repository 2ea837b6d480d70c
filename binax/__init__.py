"""binax: binary neural network optimizers as pure Optax transforms.

``import binax`` loads what needs only JAX and Optax (the optimizers, transforms, partition,
metrics, quantizers). The Flax side (`binax.nn`, `binax.linen`, `binax.models`, `binax.export`,
`binax.summary`, `binax.BinaryParam`), inference (`binax.deploy`) and the training side
(`binax.train`, `binax.data`) load on first use.
"""

import importlib
import sys
import types

from binax import quantizers
from binax.metrics import flip_counts, flip_metrics
from binax.optimizers import bop, bop2nd_order, cema, diode, sgdat
from binax.partition import binarize, binary_mask, partition
from binax.transforms import (
    clip_latent,
    flip_by_adaptive_threshold,
    flip_by_threshold,
    flip_to_descent_sign,
    scale_by_accumulation,
    scale_by_ema,
    scale_by_moment_ratio,
    scale_by_sign_ema,
    sign0,
)

__version__ = "0.1.0"

_LAZY_MODULES = ("data", "deploy", "export", "linen", "models", "nn", "train")
_LAZY_NAMES = {"BinaryParam": "binax.nn", "summary": "binax.summary"}


def __getattr__(name):
    """Loads the Flax and training modules on first use (PEP 562)."""
    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(_LAZY_NAMES[name]), name)
    elif name in _LAZY_MODULES:
        value = importlib.import_module(f"binax.{name}")
    else:
        raise AttributeError(f"module 'binax' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *_LAZY_MODULES, *_LAZY_NAMES})


class _Binax(types.ModuleType):
    def __setattr__(self, name, value):
        # `import binax.summary` sets the attribute to the module: keep the function there.
        if name == "summary" and isinstance(value, types.ModuleType):
            value = value.summary
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Binax

__all__ = [
    "BinaryParam",
    "binarize",
    "binary_mask",
    "bop",
    "bop2nd_order",
    "cema",
    "clip_latent",
    "diode",
    "flip_by_adaptive_threshold",
    "flip_by_threshold",
    "flip_counts",
    "flip_metrics",
    "flip_to_descent_sign",
    "partition",
    "scale_by_accumulation",
    "scale_by_ema",
    "scale_by_moment_ratio",
    "scale_by_sign_ema",
    "sgdat",
    "sign0",
    "summary",
    "data",
    "deploy",
    "export",
    "linen",
    "models",
    "nn",
    "quantizers",
    "train",
]
