"""Small functions both sides of binax use (optimizers and layers): ``sign0`` and key paths."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sign0(x: jax.Array) -> jax.Array:
    """``+1`` where ``x >= 0``, else ``-1``, in the dtype of ``x`` (never 0)."""
    one = jnp.ones((), jnp.result_type(x))
    return jnp.where(x >= 0, one, -one)


def path_tuple(path) -> tuple[str | int, ...]:
    """A JAX key path as a plain tuple, e.g. ``('params', 'Dense_0', 'kernel')``."""
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(getattr(k, attr))
                break
        else:  # pragma: no cover - unknown key type
            out.append(str(k))
    return tuple(out)


def path_str(path) -> str:
    """A JAX key path as ``'a/b/0/kernel'`` (``'<root>'`` for the empty path)."""
    return "/".join(str(k) for k in path_tuple(path)) or "<root>"
