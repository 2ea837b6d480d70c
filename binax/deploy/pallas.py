"""A Pallas kernel for the packed ±1 product: ``x @ w`` from the bits alone (XOR + popcount).

The issue's stretch goal, for accelerators. ``x`` (rows of ±1) and ``w`` (a ±1 kernel) are
given bit-packed along the reduction axis as `binax.deploy.program.pack_kernel` packs kernels
(8 weights a byte, bit 1 is ``+1``); bytes are grouped into uint32 words and

    x . w = fan_in - 2 * popcount(bits(x) XOR bits(w))

summed over the words (zero bits that pad both to whole words, and to a power of two of
words, always agree and are not counted in ``fan_in``). One program of the grid computes a
``(block_m, block_n)`` tile, looping over the words of the reduction axis.

Status: exact against the int8 product in interpret mode on the CPU (``tests/test_deploy.py``);
not yet compiled or timed on a GPU or TPU (none was available), and not used by `Deployed`,
whose XLA path compiles on every backend.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

__all__ = ["packed_dot"]


def _words(bits: jax.Array, axis: int) -> jax.Array:
    """uint8 bytes along ``axis`` -> uint32 words (zero bytes appended to a multiple of 4)."""
    bits = jnp.moveaxis(bits, axis, -1)
    bits = jnp.pad(bits, [(0, 0)] * (bits.ndim - 1) + [(0, -bits.shape[-1] % 4)])
    words = lax.bitcast_convert_type(bits.reshape(*bits.shape[:-1], -1, 4), jnp.uint32)
    return jnp.moveaxis(words, -1, axis)


def _kernel(x_ref, w_ref, o_ref, *, fan_in: int):
    def step(k, acc):
        xk = x_ref[:, pl.ds(k, 1)]  # (block_m, 1)
        wk = w_ref[pl.ds(k, 1), :]  # (1, block_n)
        return acc + lax.population_count(xk ^ wk).astype(jnp.int32)

    acc = jnp.zeros(o_ref.shape, jnp.int32)
    acc = lax.fori_loop(0, x_ref.shape[1], step, acc)
    o_ref[...] = fan_in - 2 * acc


@functools.partial(jax.jit, static_argnames=("fan_in", "block_m", "block_n", "interpret"))
def packed_dot(
    x_bits: jax.Array,
    w_bits: jax.Array,
    fan_in: int,
    *,
    block_m: int = 32,
    block_n: int = 128,
    interpret: bool = False,
) -> jax.Array:
    """``x @ w`` in int32 for ±1 ``x`` ``(M, fan_in)`` and ``w`` ``(fan_in, N)``, from bits.

    Args:
      x_bits: ``(M, ceil(fan_in / 8))`` uint8, ``jnp.packbits(x > 0, axis=-1)``.
      w_bits: ``(ceil(fan_in / 8), N)`` uint8, `binax.deploy.program.pack_kernel` of ``w``.
      fan_in: the length of the reduction axis before packing.
      block_m, block_n: the output tile of one program.
      interpret: run the kernel in Pallas' interpreter (any backend, e.g. the CPU, slowly).
    """
    nbytes = -(-fan_in // 8)
    if x_bits.dtype != jnp.uint8 or w_bits.dtype != jnp.uint8:
        raise ValueError(f"x_bits and w_bits must be uint8, got {x_bits.dtype}, {w_bits.dtype}")
    if x_bits.ndim != 2 or w_bits.ndim != 2 or (x_bits.shape[1], w_bits.shape[0]) != (nbytes,) * 2:
        raise ValueError(
            f"x_bits must be (M, {nbytes}) and w_bits ({nbytes}, N) for fan_in={fan_in}, got "
            f"{x_bits.shape} and {w_bits.shape}"
        )
    (m, _), n = x_bits.shape, w_bits.shape[1]
    x, w = _words(x_bits, 1), _words(w_bits, 0)
    kw = 1 << (x.shape[1] - 1).bit_length()  # a power of two of words (blocks on GPUs)
    x = jnp.pad(x, [(0, -m % block_m), (0, kw - x.shape[1])])
    w = jnp.pad(w, [(0, kw - w.shape[0]), (0, -n % block_n)])
    out = pl.pallas_call(
        functools.partial(_kernel, fan_in=fan_in),
        out_shape=jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.int32),
        grid=(x.shape[0] // block_m, w.shape[1] // block_n),
        in_specs=[
            pl.BlockSpec((block_m, kw), lambda i, j: (i, 0)),
            pl.BlockSpec((kw, block_n), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
        interpret=interpret,
    )(x, w)
    return out[:m, :n]
