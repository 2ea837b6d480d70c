"""Export binary weights: bit-packed (1 bit per weight) or int8, with per-channel scales.

Training keeps binary kernels as floats (``+1.0``/``-1.0``, or latent reals with a sign
quantizer). For deployment or storage they can be packed 8 weights per byte:

* `pack_bits` / `unpack_bits`: ``sign0(w)`` as bits along the last axis (bit 1 = ``+1``,
  bit 0 = ``-1``, big-endian within a byte as `numpy.packbits`), with the original shape, so
  unpacking is exact for ``+1``/``-1`` kernels.
* `to_int8` / `from_int8`: ``sign0(w)`` as ``int8`` ``+1``/``-1``.
* `export_binary_kernels`: every binary kernel of an NNX model, by path, with the per-output
  channel scale the forward pass applies (a layer's ``scale``, times the mean ``|w|`` of a
  ``magnitude_aware_sign`` kernel), so ``unpack_bits(p, apply_scale=True)`` is the effective
  kernel; `import_binary_kernels` writes them back.

Larq users asked for exactly this (larq/larq issues #360, #553, #685, #792: saved weights were
latent floats).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from binax import quantizers as q
from binax.nn import BinaryParam

__all__ = [
    "PackedBinary",
    "export_binary_kernels",
    "from_int8",
    "import_binary_kernels",
    "pack_bits",
    "to_int8",
    "unpack_bits",
]


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["bits", "scale"], meta_fields=["shape"]
)
@dataclasses.dataclass(frozen=True)
class PackedBinary:
    """A bit-packed binary array (a pytree: ``bits`` and ``scale`` are leaves, ``shape`` static).

    Attributes:
      bits: ``uint8`` array of shape ``(*shape[:-1], ceil(shape[-1] / 8))``; bit 1 is ``+1``.
      shape: the shape of the unpacked array.
      scale: optional per-output-channel scale (shape ``(shape[-1],)``), or ``None``.
    """

    bits: jax.Array
    shape: tuple[int, ...]
    scale: jax.Array | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the packed bits (the scale not included)."""
        return int(np.prod(self.bits.shape))


def pack_bits(w: jax.Array, scale: jax.Array | None = None) -> PackedBinary:
    """Packs ``sign0(w)`` into bits along the last axis (8 weights per ``uint8``).

    Lossless for arrays of ``+1``/``-1``; any other array is binarized first (``w >= 0`` becomes
    ``+1``, the value the forward pass's ``ste_sign`` sees). Works under `jax.jit`.

    Args:
      w: array with at least one axis.
      scale: optional per-channel scale stored alongside (not applied).
    """
    w = jnp.asarray(w)
    if w.ndim == 0:
        raise ValueError("pack_bits: w must have at least one axis, got a scalar")
    bits = jnp.packbits(w >= 0, axis=-1)
    return PackedBinary(bits=bits, shape=tuple(w.shape), scale=scale)


def unpack_bits(
    packed: PackedBinary, dtype: Any = jnp.float32, *, apply_scale: bool = False
) -> jax.Array:
    """Inverse of `pack_bits`: an array of ``+1``/``-1`` of ``packed.shape`` in ``dtype``.

    With ``apply_scale=True`` the result is multiplied by ``packed.scale`` along the last axis.
    """
    n = packed.shape[-1]
    bits = jnp.unpackbits(packed.bits, axis=-1, count=n)
    w = (2 * bits.astype(jnp.int8) - 1).astype(dtype).reshape(packed.shape)
    if apply_scale:
        if packed.scale is None:
            raise ValueError("unpack_bits: apply_scale=True but packed.scale is None")
        w = w * jnp.asarray(packed.scale, dtype)
    return w


def to_int8(w: jax.Array) -> jax.Array:
    """``sign0(w)`` as ``int8`` (``+1`` where ``w >= 0``, ``-1`` elsewhere)."""
    return jnp.where(jnp.asarray(w) >= 0, jnp.int8(1), jnp.int8(-1))


def from_int8(w: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """An ``int8`` ``+1``/``-1`` array as ``dtype``."""
    return jnp.asarray(w).astype(dtype)


def _is_magnitude_aware(quantizer) -> bool:
    while isinstance(quantizer, functools.partial):
        quantizer = quantizer.func
    return quantizer is q.magnitude_aware_sign


def _effective_scale(module: nnx.Module, kernel: jax.Array) -> jax.Array | None:
    """The per-output-channel factor that multiplies ``sign0(kernel)`` in the forward pass."""
    scale = None
    layer_scale = getattr(module, "scale", None)
    if isinstance(layer_scale, nnx.Variable):
        scale = jnp.asarray(layer_scale.get_value())
    if _is_magnitude_aware(getattr(module, "kernel_quantizer", None)):
        mag = jnp.mean(jnp.abs(kernel), axis=tuple(range(kernel.ndim - 1)))
        scale = mag if scale is None else scale * mag
    return scale


def _binary_kernels(model: nnx.Module):
    for path, module in nnx.iter_modules(model):
        for name, var in vars(module).items():
            if isinstance(var, BinaryParam):
                yield "/".join(str(p) for p in (*path, name)), module, var


def export_binary_kernels(
    model: nnx.Module, *, format: str = "packed", include_scale: bool = True
) -> dict[str, Any]:
    """Every binary kernel (`binax.nn.BinaryParam`) of ``model``, keyed by path.

    Args:
      model: an NNX module.
      format: ``"packed"`` (a `PackedBinary` per kernel) or ``"int8"`` (a dict with ``"int8"``
        and ``"scale"``).
      include_scale: store the per-output-channel scale the layer applies to the binary kernel
        (its ``scale`` Variable times, for ``magnitude_aware_sign`` kernels, ``mean |w|`` per
        output channel), or ``None`` where there is none.

    Returns:
      ``{"blocks/0/conv1/kernel": PackedBinary(...), ...}``.

    Raises:
      ValueError: unknown ``format``, or ``model`` has no binary kernel.
    """
    if format not in ("packed", "int8"):
        raise ValueError(
            f"export_binary_kernels: format must be 'packed' or 'int8', got {format!r}"
        )
    out: dict[str, Any] = {}
    for path, module, var in _binary_kernels(model):
        kernel = jnp.asarray(var.get_value())
        scale = _effective_scale(module, kernel) if include_scale else None
        if format == "packed":
            out[path] = pack_bits(kernel, scale)
        else:
            out[path] = {"int8": to_int8(kernel), "scale": scale}
    if not out:
        raise ValueError("export_binary_kernels: model has no binary kernel (BinaryParam)")
    return out


def import_binary_kernels(model: nnx.Module, exported: dict[str, Any]) -> None:
    """Writes exported binary kernels back into ``model`` (in place) as ``+1``/``-1`` floats.

    Accepts the output of `export_binary_kernels` in either format. Scales are not written back.

    Raises:
      ValueError: a path of ``exported`` is not a binary kernel of ``model``, or a shape differs.
    """
    kernels = {path: var for path, _, var in _binary_kernels(model)}
    for path, value in exported.items():
        if path not in kernels:
            raise ValueError(
                f"import_binary_kernels: {path!r} is not a binary kernel of the model "
                f"(binary kernels: {sorted(kernels)})"
            )
        var = kernels[path]
        dtype = jnp.asarray(var.get_value()).dtype
        if isinstance(value, PackedBinary):
            w = unpack_bits(value, dtype)
        else:
            w = from_int8(value["int8"], dtype)
        if w.shape != jnp.shape(var.get_value()):
            raise ValueError(
                f"import_binary_kernels: shape {w.shape} for {path!r}, the model has "
                f"{jnp.shape(var.get_value())}"
            )
        var.set_value(w)
