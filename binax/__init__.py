"""binax: binary neural network optimizers as pure Optax transforms."""

from binax import data, export, linen, models, nn, quantizers
from binax.metrics import flip_counts, flip_metrics
from binax.nn import BinaryParam
from binax.optimizers import bop, bop2nd_order, cema, diode, sgdat
from binax.partition import binarize, binary_mask, partition
from binax.summary import summary
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
    "export",
    "linen",
    "models",
    "nn",
    "quantizers",
]
