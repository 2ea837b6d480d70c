"""A cheap 32-bit integer mix, shared by Diode's initial state and checkpoint fingerprints."""

import jax
import jax.numpy as jnp


def mix32(x: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finalizer: a bijective mix of uint32 values, elementwise."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)
