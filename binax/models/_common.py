"""Small helpers shared by the reference architectures."""

from __future__ import annotations

import math
from collections.abc import Sequence

from flax import nnx


def image_shape(input_shape: Sequence[int], name: str) -> tuple[int, int, int]:
    """Checks an ``(height, width, channels)`` input shape."""
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ValueError(
            f"{name}: input_shape must be (height, width, channels) of positive ints, "
            f"got {input_shape!r}"
        )
    return shape


def scaled(width: int, multiplier: float) -> int:
    """``round(width * multiplier)``, at least 1."""
    return max(1, int(round(width * multiplier)))


def batch_norm(features: int, *, use_scale: bool, momentum: float, rngs: nnx.Rngs):
    """BatchNorm over the last axis; ``model.train()`` / ``model.eval()`` switch its statistics."""
    return nnx.BatchNorm(features, use_scale=use_scale, momentum=momentum, epsilon=1e-5, rngs=rngs)


def flat_size(shape: Sequence[int]) -> int:
    return math.prod(shape)


def float_if_integer(arithmetic: str) -> str:
    """The ``arithmetic`` of a layer with a real operand: ``'integer'`` becomes ``'float'``.

    A model built with ``arithmetic='integer'`` multiplies in integers wherever both operands
    are binary; its layers with a real input or a real kernel multiply in float.
    """
    return "float" if arithmetic == "integer" else arithmetic
