"""The deployed program: a list of nodes, the function that runs it, and threshold folding.

A program is a list of nodes, each a dict ``{"op": kind, ...static fields..., "arrays": {...}}``
(``residual`` nodes hold two sub-programs, ``body`` and ``shortcut``). Static fields are JSON
values; arrays are NumPy arrays. The kinds, with the dtype they take and give:

=============  ===============  ==============================================================
``sign``       float -> int8    ``+1`` where ``x >= 0``, else ``-1`` (`binax.sign0`)
``int_dense``  int8 -> int32    ``x @ W``, ``W`` ±1 unpacked from bits, int32 accumulation
                                (XOR + popcount on the bits for 1-2 rows)
``int_conv``   int8 -> int32    ``conv(pad(x, pad_value), W)``, exactly: zero padding plus a
                                batch-independent border term (on the CPU, followed by a
                                ``threshold``: XOR + popcount on packed words, see `Packed`)
``threshold``  int32 -> int8    ``+1`` where ``s * y >= t`` (per channel), else ``-1``;
                                optionally max pooled (exactly, see `_threshold`)
``dense``      float -> float   ``x @ W`` (W float, or ±1 from bits)
``conv``       float -> float   ``conv(pad(x, pad_value), W)`` in float (one input channel, ±1
                                ``W``, 4+ images, on the CPU: a sum of shifted inputs)
``affine``     float -> float   ``x * scale + bias`` (a binary layer's scale and bias)
``batchnorm``  float -> float   BatchNorm with running statistics, in Flax's op order
``maxpool``    any -> same      max over windows (integers stay integers)
``avgpool``    float -> float   `flax.linen.avg_pool`
``flatten``    any -> same      ``(batch, -1)``
``mean``       float -> float   mean over the spatial axes
``residual``   float -> float   ``body(x) + shortcut(x)`` (empty shortcut: ``x``)
=============  ===============  ==============================================================

Float kinds given an integer input convert it to float32 first (exact: ``|y| < 2**24``), so a
binary product not followed by a sign keeps an exact integer product with a float epilogue.

Binary kernels are stored bit-packed along the reduction axis: a dense kernel ``(in, out)`` as
``(ceil(in / 8), out)`` bytes, a convolution kernel ``(*window, in, out)`` as
``(ceil(prod(window) * in / 8), out)`` bytes (`pack_kernel`), and unpacked to int8 inside the
jitted function (`unpack_kernel`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from binax.nn import functional as F

__all__ = [
    "Packed",
    "activation_nbytes",
    "fold_thresholds",
    "has_kernel_words",
    "kernel_words",
    "pack",
    "pack_kernel",
    "run",
    "threshold_from_decisions",
    "unpack",
    "unpack_kernel",
    "with_kernel_words",
]

OPS = (
    "sign", "int_dense", "int_conv", "threshold", "dense", "conv", "affine", "batchnorm",
    "maxpool", "avgpool", "flatten", "mean", "residual",
)  # fmt: skip
INT_PRODUCTS = ("int_dense", "int_conv")
ELEMENTWISE = ("affine", "batchnorm")


# ---------------------------------------------------------------------------------------------
# Kernels packed along the reduction axis


def pack_kernel(kernel: np.ndarray) -> np.ndarray:
    """``sign0(kernel)`` of shape ``(*reduction, out)`` as bits ``(ceil(prod(reduction)/8), out)``.

    Bit ``7 - r % 8`` of byte ``[r // 8, o]`` is ``kernel.reshape(-1, out)[r, o] >= 0`` (1 is
    ``+1``): 8 consecutive weights along the reduction axis per byte, as `numpy.packbits`.
    """
    kernel = np.asarray(kernel)
    return np.packbits(kernel.reshape(-1, kernel.shape[-1]) >= 0, axis=0)


def unpack_kernel(bits: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """The ±1 kernel of ``shape`` (``(*reduction, out)``) in ``dtype`` from `pack_kernel`'s bits.

    Shifts over a new axis of 8 and a reshape, no transpose: cheap enough to run inside the
    jitted forward (the kernels stay packed in memory).
    """
    fan_in = math.prod(shape[:-1])
    shifts = jnp.arange(7, -1, -1, dtype=jnp.uint8)[None, :, None]
    b = (bits[:, None, :] >> shifts) & jnp.uint8(1)
    w = (2 * b.astype(jnp.int8) - 1).reshape(-1, shape[-1])[:fan_in]
    return w.reshape(shape).astype(dtype)


def _kernel(node: dict, arrays: dict, dtype: Any) -> jax.Array:
    if "bits" in arrays:
        return unpack_kernel(arrays["bits"], tuple(node["kernel_shape"]), dtype)
    return arrays["kernel"].astype(dtype)


# ---------------------------------------------------------------------------------------------
# Binary activations packed 32 channels to a word


class Packed(NamedTuple):
    """Binary activations ``(batch, *spatial, channels)`` of ±1, 32 channels to a ``uint32`` word.

    Bit ``j`` of word ``d`` is channel ``32 * d + j``, set for ``+1``. The bits past the last
    channel are set too (``+1``), as they are in the kernels' words (`kernel_words`), so that
    they always agree and add nothing to a popcount of the XOR.
    """

    words: jax.Array  # (batch, *spatial, ceil(channels / 32)) uint32
    channels: int


def pack(on: jax.Array, fill: bool = True) -> Packed:
    """`Packed` from booleans ``on`` (``True``: ``+1``) along the last axis; ``fill`` for the
    bits past the last channel."""
    c = on.shape[-1]
    words = -(-c // 32)
    on = jnp.pad(on, [(0, 0)] * (on.ndim - 1) + [(0, 32 * words - c)], constant_values=fill)
    bits = on.reshape(*on.shape[:-1], words, 32).astype(jnp.uint32)
    shifts = jnp.arange(32, dtype=jnp.uint32)
    return Packed(jnp.sum(bits << shifts, axis=-1, dtype=jnp.uint32), c)


def unpack(x: Packed) -> jax.Array:
    """The int8 ±1 activations of `Packed` ``x``."""
    bits = (x.words[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & jnp.uint32(1)
    bits = bits.reshape(*x.words.shape[:-1], -1)[..., : x.channels]
    return 2 * bits.astype(jnp.int8) - 1


def kernel_words(node: dict, a: dict) -> jax.Array:
    """The ±1 kernel ``(*window, in, out)`` of a conv node, from its ``bits``, as `Packed` words
    along the input channels, ``(*window, ceil(in / 32), out)``.

    `Deployed` computes them once, outside its jitted call (`with_kernel_words`): computed
    inside, XLA:CPU's product pass over them runs 1.8x slower with 2-4 words per position.
    """
    w = unpack_kernel(a["bits"], tuple(node["kernel_shape"]), jnp.int8)
    return jnp.moveaxis(pack(jnp.moveaxis(w, -1, -2) > 0).words, -1, -2)


def with_kernel_words(program: list, arrays: list) -> list:
    """``arrays`` with the `kernel_words` of every node that `_packed_applies` to, as
    ``"words"``, computed now (NumPy)."""
    out = []
    for i, (node, a) in enumerate(zip(program, arrays, strict=True)):
        if node["op"] == "residual":
            body = with_kernel_words(node["body"], a["body"])
            a = {"body": body, "shortcut": with_kernel_words(node["shortcut"], a["shortcut"])}
        elif _packed_applies(program, i, arrays):
            a = {**a, "words": np.asarray(kernel_words(node, a))}
        out.append(a)
    return out


def _popcount_conv(x: Packed, w_words: jax.Array, spec: F._Spec) -> jax.Array:
    """``conv(pad(x, +1), W)`` in int32 from the packed words of ``x`` and of ``W``.

    Each kernel position and word adds ``popcount(x_word XOR w_word)``, the disagreements, and
    ``x . w = fan_in - 2 * disagreements``. Elementwise work that XLA fuses with the threshold
    and the packing after it into one pass that writes 32 channels per word, where XLA:CPU's
    int8 convolution writes 32-bit sums: ``binax deployed`` against ``binax deployed, int8
    convs`` in benchmarks/inference.py (BENCHMARKS.md section 5).
    """
    window = w_words.shape[:-2]
    ones = np.uint32(0xFFFFFFFF)
    pieces, _ = F.shifted_windows(x.words, window, spec, ones, axis=1)
    disagree = None
    for k, piece in zip(np.ndindex(*window), pieces, strict=True):
        for d in range(w_words.shape[-2]):
            term = lax.population_count(piece[..., d, None] ^ w_words[(*k, d)])
            term = term.astype(jnp.int32)
            disagree = term if disagree is None else disagree + term
    return math.prod(window) * x.channels - 2 * disagree


def _or_pool(x: Packed, pool: dict) -> Packed:
    """Max pooling of ±1 activations: the OR of the windows' words (padding adds ``-1``)."""
    spec = _pool_spec(x.words.shape[1:-1], pool)
    pieces, _ = F.shifted_windows(x.words, tuple(pool["window"]), spec, np.uint32(0), axis=1)
    return x._replace(words=functools.reduce(jnp.bitwise_or, pieces))


def _pool_spec(spatial, pool: dict) -> F._Spec:
    """`binax.nn.functional.pool_spec` of a pooling of binary activations.

    Raises:
      ValueError: a window that holds only padding (explicit padding at least the window):
        it has no binary value (the float model would see ``-inf`` there).
    """
    window, strides = tuple(pool["window"]), tuple(pool["strides"])
    spec = F.pool_spec(spatial, window, strides, _padding_spec(pool["padding"]))
    out = F._out_shape(spatial, window, spec)
    for n, w, s, (lo, _), m in zip(spatial, window, strides, spec.pads, out, strict=True):
        if m and (lo >= w or (m - 1) * s - lo >= n):
            raise ValueError(
                f"max pooling of binary activations with padding {pool['padding']!r} has windows "
                "that hold only padding (no binary value); pad less than the window"
            )
    return spec


def _packed_applies(program: list, i: int, arrays: list) -> bool:
    """Whether ``program[i]`` and the threshold after it run on packed words (`_packed_conv`)."""
    node = program[i]
    return (
        jax.default_backend() == "cpu"
        and node["op"] == "int_conv"
        and i + 1 < len(program)
        and program[i + 1]["op"] == "threshold"
        and "bits" in arrays[i]
        and node["groups"] == 1
        and node["pad_value"] in (None, 0, 1, -1)
    )


def _packed_conv(x, node: dict, a: dict, after: dict, after_a: dict, borders: dict, where: str):
    """``int_conv`` (``node``, ``a``) and the ``threshold`` after it on packed words: the
    product (int32) and the thresholded activations (`Packed`)."""
    if not isinstance(x, Packed):
        x = _materialized(pack(x > 0))
    image = jax.ShapeDtypeStruct((1, *x.words.shape[1:-1], x.channels), jnp.int8)
    spec = _spec(node, image, integer=True)
    # _popcount_conv pads with +1; padding with v instead adds (v - 1) * conv(B, W) (B: 1 on the
    # border), which does not depend on the batch.
    key = f"{where}:packed"
    if key not in borders:
        w = _kernel(node, a, jnp.int8)
        borders[key] = _border(w, spec._replace(pad_value=spec.pad_value - 1), image)
    y = _popcount_conv(x, a["words"] if "words" in a else kernel_words(node, a), spec)
    if borders[key] is not None:
        y = y + borders[key]
    return y, _materialized(_threshold(y, after_a, after.get("pool"), packed=True))


def _materialized(x: Packed) -> Packed:
    """``x``, written out: XLA would otherwise fuse the work that makes the words (packing,
    pooling, flips) into the pass of the product that reads them, and redo it for every kernel
    position and output channel (2-3x slower)."""
    return x._replace(words=lax.optimization_barrier(x.words))


# ---------------------------------------------------------------------------------------------
# Running a program


def _float(x: jax.Array) -> jax.Array:
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


def _spec(node: dict, x: jax.Array, integer: bool) -> F._Spec:
    """The `binax.nn.functional` description of a conv node's product on inputs like ``x``."""
    strides, dilation = tuple(node["strides"]), tuple(node["dilation"])
    pads = F.conv_padding(
        _padding_spec(node["padding"]),
        x.shape[1:-1],
        node["kernel_shape"][:-2],
        strides,
        dilation,
    )
    return F._Spec(
        integer=integer,
        backward_dtype=None,
        precision=None,
        strides=strides,
        pads=tuple(pads),
        dilation=dilation,
        groups=node["groups"],
        pad_value=float(node["pad_value"] or 0),
    )


def _padding_spec(padding):
    if isinstance(padding, list):
        return [tuple(p) if isinstance(p, list) else p for p in padding]
    return padding


def _int_conv(x: jax.Array, w: jax.Array, spec: F._Spec, border: jax.Array | None):
    """``conv(pad(x, pad_value), w)`` in int32 for int8 ``x`` and ``w``: zero padding plus the
    border term ``border`` (`_border`; ``None``: no padding with a nonzero constant)."""
    y = F._conv_op(x, w, spec, spec.pads, jnp.int32)
    return y if border is None else y + border


def _border(w: jax.Array, spec: F._Spec, x: jax.Array) -> jax.Array | None:
    """The padding's share of `_int_conv` for one image shaped like ``x`` (the same for all)."""
    if not F._has_border(spec):
        return None
    return F._conv_op(F._border(x, spec), w, spec, "VALID", jnp.int32)[0]


def _maxpool(x, node):
    if not jnp.issubdtype(x.dtype, jnp.floating):
        _pool_spec(x.shape[1:-1], node)  # integers have no -inf for windows of padding
    return F.max_pool(
        x, tuple(node["window"]), tuple(node["strides"]), _padding_spec(node["padding"])
    )


# A dense product without options (XLA's default precision), as the float layers compute it.
_PLAIN = F._Spec(integer=False, backward_dtype=None, precision=None)


def run(
    program: list,
    arrays: list,
    x: jax.Array,
    borders: dict,
    path: str = "",
    seen: list | None = None,
    packed: bool = True,
) -> jax.Array:
    """Runs ``program`` on ``x`` (jittable; ``program`` static, ``arrays`` its arrays by node).

    ``borders`` maps an ``int_conv`` node's path to its border term; a missing one is computed
    and stored into ``borders`` (`Deployed` does this once per input shape, outside the batch).
    With ``seen``, each node's output is appended to it (see `activation_nbytes`). With
    ``packed=False``, binary convolutions stay int8 products where `_packed_applies` would
    take them to packed words (for comparisons).
    """
    skip = False
    for i, (node, a) in enumerate(zip(program, arrays, strict=True)):
        op, where = node["op"], f"{path}{i}"
        if skip:  # the threshold that `_packed_conv` applied
            skip = False
            continue
        if packed and _packed_applies(program, i, arrays):
            y, x = _packed_conv(x, node, a, program[i + 1], arrays[i + 1], borders, where)
            skip = True
            if seen is not None:  # the product (fused away, but counted) and the threshold
                seen += [y, x.words]
            continue
        if isinstance(x, Packed):
            x = unpack(x)
        if op == "sign":
            x = jnp.where(x >= 0, jnp.int8(1), jnp.int8(-1))
        elif op == "int_dense":
            x = _int_dense(x, node, a)
        elif op == "int_conv":
            w = _kernel(node, a, jnp.int8)
            spec = _spec(node, x, integer=True)
            if where not in borders:
                borders[where] = _border(w, spec, x)
            x = _int_conv(x, w, spec, borders[where])
        elif op == "threshold":
            x = _threshold(x, a, node.get("pool"))
        elif op == "dense":
            x = _float(x)
            x = F._scale_and_bias(F._dot(x, _kernel(node, a, x.dtype), _PLAIN), None, a.get("bias"))
        elif op == "conv":
            x = _float(x)
            spec = _spec(node, x, integer=False)
            conv = _shifted_sum if _shifted_sum_applies(node, a, spec, len(x)) else F._conv
            y = conv(x, _kernel(node, a, x.dtype), spec)
            x = F._scale_and_bias(y, None, a.get("bias"))
        elif op == "affine":
            x = F._scale_and_bias(_float(x), a.get("scale"), a.get("bias"))
        elif op == "batchnorm":
            x = _batchnorm(_float(x), a, node["epsilon"])
        elif op == "maxpool":
            x = _maxpool(x, node)
        elif op == "avgpool":
            x = nn.avg_pool(
                _float(x),
                tuple(node["window"]),
                strides=tuple(node["strides"]),
                padding=_padding_spec(node["padding"]),
                count_include_pad=node["count_include_pad"],
            )
        elif op == "flatten":
            x = x.reshape((x.shape[0], -1))
        elif op == "mean":
            x = jnp.mean(_float(x), axis=tuple(range(1, x.ndim - 1)))
        elif op == "residual":
            body = run(node["body"], a["body"], x, borders, f"{where}b", seen, packed)
            short = run(node["shortcut"], a["shortcut"], x, borders, f"{where}s", seen, packed)
            x = body + short
        else:
            raise ValueError(f"unknown deployed op {op!r} at node {where}")
        if seen is not None:
            seen.append(x)
    return unpack(x) if isinstance(x, Packed) else x


def activation_nbytes(
    program: list, arrays: list, x: jax.Array, borders: dict, packed: bool = True
) -> int:
    """Bytes of the largest node output of ``program`` on ``x`` (shapes only, nothing runs)."""
    seen: list = []
    f = functools.partial(run, program, borders=dict(borders), seen=seen, packed=packed)
    jax.eval_shape(f, arrays, x)
    return max(v.size * v.dtype.itemsize for v in seen)


# From this many images on, `_shifted_sum` is faster than XLA:CPU's convolution plus the pass
# after it (BinaryNet's first layer, 28x28x1 -> 32, with its BatchNorm + sign, on a 2-core
# Xeon: 0.043 vs 0.067 ms for 1 image, even at 4, 0.50 vs 0.27 ms for 32).
SHIFTED_SUM_MIN_BATCH = 4


def _shifted_sum_applies(node: dict, a: dict, spec: F._Spec, batch: int) -> bool:
    """Whether `_shifted_sum` computes this float conv node on ``batch`` inputs, bit for bit as
    `F._conv` does, and faster."""
    return (
        jax.default_backend() == "cpu"
        and batch >= SHIFTED_SUM_MIN_BATCH
        and "bits" in a  # a ±1 kernel: every product exact
        and node["kernel_shape"][-2] == 1  # one input channel (and no groups)
        and not F._has_border(spec)
    )


def _shifted_sum(x: jax.Array, w: jax.Array, spec: F._Spec) -> jax.Array:
    """``conv(pad(x, 0), w)`` for a one-channel ``x`` and ±1 ``w`` as a sum of shifted copies.

    The output is ``sum_k x_k * w[k]`` over the kernel positions ``k`` in row-major order, each
    ``x_k`` the padded input shifted by ``k`` (strided, dilated): elementwise work that XLA
    fuses with the BatchNorm + sign after it, one pass over the output, where XLA:CPU's
    convolution of a one-channel input is slow (about 4x fewer binary-layer operations per
    second than the int8 convolutions that follow, BinaryNet x0.25 on 28x28x1 on a 2-core
    Xeon) and needs a second pass for the sign. The same bits as XLA:CPU's convolution, which
    sums a one-channel input's kernel positions in this order (the products are exact, being
    ``±x``); tests/test_deploy.py checks it, and `_shifted_sum_applies` keeps other backends
    on the convolution.
    """
    window = w.shape[:-2]
    pieces, _ = F.shifted_windows(x, window, spec, 0.0, axis=1)
    y = None
    for k, xk in zip(np.ndindex(*window), pieces, strict=True):
        term = xk * w[(*k, 0)]
        y = term if y is None else y + term
    return y


# The batch runs in chunks whose largest activation takes at most this many bytes: XLA:CPU's
# convolutions slow down 2-4x when their operands outgrow the caches (measured on a 2-core Xeon,
# BinaryNet widths 0.25-1: the best chunks hold 2-4 MiB, a whole batch of 256 holds 25-100 MiB).
CHUNK_NBYTES = 4 * 2**20
# The same with binary convolutions on packed words, whose int32 products are never written out
# (BinaryNet widths 0.25-1 on a 2-core Xeon: chunks of 64-256 images beat 16-32 by 10-25%).
PACKED_CHUNK_NBYTES = 16 * 2**20


def has_kernel_words(arrays: list) -> bool:
    """Whether a node of ``arrays`` (from `with_kernel_words`) runs on packed words."""
    return any(
        "words" in a
        or has_kernel_words(a.get("body", []))
        or has_kernel_words(a.get("shortcut", []))
        for a in arrays
    )


# At most this many rows, a dense product runs as XOR + popcount on the packed words (no
# unpacking); above, as an int8 product. Measured on a 2-core Xeon (K 1152-4608, N 256-1024):
# popcount 3-10x faster for one row, even at 8 rows, slower beyond.
POPCOUNT_MAX_ROWS = 2


def _int_dense(x: jax.Array, node: dict, a: dict) -> jax.Array:
    """``x @ W`` exactly in int32 for ``x`` of int8 ±1 and ``W`` packed by `pack_kernel`."""
    fan_in = node["kernel_shape"][0]
    if math.prod(x.shape[:-1]) > POPCOUNT_MAX_ROWS or "bits" not in a:
        return F._dot(x, _kernel(node, a, jnp.int8), _PLAIN, jnp.int32)
    # x . w = (agreements - disagreements) = fan_in - 2 * popcount(bits(x) XOR bits(w)); the
    # zero bits that pad both to whole bytes always agree and are not counted in fan_in.
    xb = jnp.packbits(x > 0, axis=-1)  # (..., K/8), the same bit order as pack_kernel
    diff = lax.population_count(xb[..., :, None] ^ a["bits"])
    return fan_in - 2 * jnp.sum(diff, axis=-2, dtype=jnp.int32)


def _threshold(y: jax.Array, a: dict, pool: dict | None, packed: bool = False):
    """``+1`` where ``s * y >= t``, else ``-1`` (int8, or `Packed` if ``packed``); with ``pool``,
    max pooling of ``y`` first.

    Pooling is done after the comparison, on the decisions, which is exact: a channel with
    ``s = +1`` decides increasingly in ``y``, so the decision at ``max(y)`` is the max of the
    decisions; one with ``s = -1`` decides decreasingly, so it is their min, taken here as the
    max of the flipped decisions, flipped back (``s = 0`` is constant: either way). On packed
    words the max of ±1 decisions is the OR of their bits (`_or_pool`).
    """
    on = a["s"] * y >= a["t"]
    flip = a["s"] < 0 if pool is not None and pool["flip"] else None
    if packed:
        if pool is None:
            return pack(on)
        if flip is None:
            return _or_pool(pack(on), pool)
        x = _or_pool(pack(on != flip), pool)
        return x._replace(words=x.words ^ pack(flip, fill=False).words)
    if pool is None:
        return jnp.where(on, jnp.int8(1), jnp.int8(-1))
    if flip is None:  # no decreasing channel
        return _maxpool(jnp.where(on, jnp.int8(1), jnp.int8(-1)), pool)
    x = _maxpool(jnp.where(on != flip, jnp.int8(1), jnp.int8(-1)), pool)
    return jnp.where(flip, -x, x)


def _batchnorm(x: jax.Array, a: dict, epsilon: float) -> jax.Array:
    """Flax's BatchNorm with running statistics, the same operations in the same order."""
    y = x - a["mean"]
    mul = lax.rsqrt(a["var"] + epsilon)
    if "scale" in a:
        mul = mul * a["scale"]
    y = y * mul
    if "bias" in a:
        y = y + a["bias"]
    return y


# ---------------------------------------------------------------------------------------------
# BatchNorm + sign as integer thresholds


def fan_in(node: dict) -> int:
    """How many ±1 products an output of an integer product node sums."""
    shape = node["kernel_shape"]
    if node["op"] == "int_conv":
        return math.prod(shape[:-1])
    return shape[0]


def threshold_from_decisions(ys: np.ndarray, decisions: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per-channel ``(s, t)`` with ``(s * y >= t) == decisions`` for every ``y`` in ``ys``.

    Args:
      ys: ``(K,)`` increasing integers.
      decisions: ``(K, C)`` bools, the float model's ``sign(...) == +1`` at each ``y``.

    Returns:
      int32 ``s`` (``+1``: on at and above ``t``; ``-1``: on at and below ``-t``; ``0``: a
      constant channel, on iff ``t <= 0``) and int32 ``t``, each ``(C,)``.

    Raises:
      ValueError: a channel whose decisions are not monotone in ``y`` (then no threshold exists).
    """
    d = np.asarray(decisions, bool)
    up = np.all(d[1:] >= d[:-1], axis=0)
    down = np.all(d[1:] <= d[:-1], axis=0)
    const = np.all(d == d[:1], axis=0)
    if not np.all(up | down):
        bad = np.flatnonzero(~(up | down))
        raise ValueError(
            f"channels {bad[:8].tolist()} switch sign more than once over the integer range; "
            "the layer after the binary product is not monotone (is it a BatchNorm?)"
        )
    s = np.where(const, 0, np.where(up, 1, -1)).astype(np.int32)
    first_on = ys[np.argmax(d, axis=0)]  # smallest y that is on (up)
    last_on = ys[len(ys) - 1 - np.argmax(d[::-1], axis=0)]  # largest y that is on (down)
    t = np.where(const, np.where(d[0], 0, 1), np.where(up, first_on, -last_on))
    return s, t.astype(np.int32)


def fold_thresholds(program: list, arrays: list) -> tuple[list, list]:
    """Replaces ``int product, [maxpool], (affine | batchnorm)*, [flatten], sign`` by a threshold.

    The float model decides ``sign(BN(y)) == +1`` in float32 for an integer ``y`` in
    ``[-fan_in, fan_in]``; here every such ``y`` is run through the same float operations
    (`_batchnorm`, the same order as Flax) and the decisions turned into ``(s, t)`` with
    `threshold_from_decisions`, so the integer comparison reproduces the float decision at every
    reachable input, ties included. A max pooling between the product and the BatchNorm moves
    into the threshold (`_threshold`: on int8 decisions, not int32 sums); a flatten between the
    BatchNorm and the sign moves after the threshold.
    """
    out_p, out_a = [], []
    i = 0
    while i < len(program):
        node, a = program[i], arrays[i]
        if node["op"] == "residual":
            body = fold_thresholds(node["body"], a["body"])
            short = fold_thresholds(node["shortcut"], a["shortcut"])
            out_p.append({**node, "body": body[0], "shortcut": short[0]})
            out_a.append({"body": body[1], "shortcut": short[1]})
            i += 1
            continue
        out_p.append(node)
        out_a.append(a)
        i += 1
        if node["op"] not in INT_PRODUCTS:
            continue
        j = i
        pool = None
        if j < len(program) and program[j]["op"] == "maxpool":
            pool = {key: program[j][key] for key in ("window", "strides", "padding")}
            j += 1
        k = j
        while k < len(program) and program[k]["op"] in ELEMENTWISE:
            k += 1
        flat = k < len(program) and program[k]["op"] == "flatten"
        if k + flat >= len(program) or program[k + flat]["op"] != "sign":
            continue
        n = fan_in(node)
        ys = np.arange(-n, n + 1, dtype=np.int32)
        f = jax.jit(functools.partial(run, program[j:k], arrays[j:k], borders={}))
        channels = node["kernel_shape"][-1]
        values = f(jnp.broadcast_to(ys.astype(np.float32)[:, None], (len(ys), channels)))
        s, t = threshold_from_decisions(ys, np.asarray(values) >= 0)
        if pool:
            pool["flip"] = bool(np.any(s < 0))
        out_p.append({"op": "threshold", **({"pool": pool} if pool else {})})
        out_a.append({"s": s, "t": t})
        if flat:  # sign(flatten(z)) == flatten(sign(z))
            out_p.append({"op": "flatten"})
            out_a.append({})
        i = k + flat + 1
    return out_p, out_a
