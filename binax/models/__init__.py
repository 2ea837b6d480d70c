"""Reference binary architectures (Flax NNX), by class or by name with `get`.

The image models take ``input_shape=(height, width, channels)``, ``num_classes`` and
``rngs=nnx.Rngs(...)``, are called as ``model(x)`` on NHWC float images and return logits.
`BinaryEncoder` (``"encoder"``) takes ``vocab_size`` instead and classifies token-id sequences.
BatchNorm follows Flax NNX: ``model.train()`` / ``model.eval()`` switch between batch and running
statistics.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from binax.models.binarynet import BinaryNet
from binax.models.mlp import BinaryMLP
from binax.models.resnet import BinaryResNet18, BiRealBlock
from binax.models.transformer import (
    BinaryEncoder,
    BinaryViT,
    TransformerOutput,
    distillation_loss,
    outputs,
)
from binax.nn import _show_init_signature

__all__ = [
    "BiRealBlock",
    "BinaryEncoder",
    "BinaryMLP",
    "BinaryNet",
    "BinaryResNet18",
    "BinaryViT",
    "TransformerOutput",
    "distillation_loss",
    "get",
    "names",
    "outputs",
]

for _cls in (BinaryMLP, BinaryNet, BinaryResNet18, BiRealBlock, BinaryEncoder, BinaryViT):
    _show_init_signature(_cls)

_REGISTRY: dict[str, type[nnx.Module]] = {
    "mlp": BinaryMLP,
    "binarynet": BinaryNet,
    "resnet18": BinaryResNet18,
    "vit": BinaryViT,
    "encoder": BinaryEncoder,
}


def names() -> tuple[str, ...]:
    """The names accepted by `get`."""
    return tuple(_REGISTRY)


def get(name: str, **kwargs: Any) -> nnx.Module:
    """Builds the architecture registered as ``name`` with ``kwargs``.

    Example: ``binax.models.get("binarynet", input_shape=(28, 28, 1), num_classes=10,
    width_multiplier=1/16, rngs=nnx.Rngs(0))``.

    Raises:
      ValueError: unknown ``name`` (the message lists the valid names).
    """
    try:
        cls = _REGISTRY[name.lower() if isinstance(name, str) else name]
    except (KeyError, TypeError):
        raise ValueError(
            f"name: unknown model {name!r}; valid names are {', '.join(repr(n) for n in _REGISTRY)}"
        ) from None
    return cls(**kwargs)
