"""Argument checks shared by the transforms: clear errors that name the argument."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from binax._ops import path_str


def check_scalar(
    name: str,
    value: Any,
    ok: Callable[[float], bool],
    expected: str,
    *,
    schedule_ok: bool = True,
) -> None:
    """Raises ValueError naming `name` when a concrete `value` fails `ok`.

    Schedules (callables) and traced values (inside `optax.inject_hyperparams` updates) cannot be
    checked when the transform is built; `inject_hyperparams` builds the transform once with
    concrete values in `init`, so injected values are checked there.
    """
    if callable(value):
        if not schedule_ok:
            raise TypeError(f"{name} must be a number, not a schedule; got {value!r}")
        return
    if isinstance(value, jax.core.Tracer):
        return
    try:
        arr = np.asarray(value)
    except Exception as e:  # pragma: no cover - exotic objects
        raise TypeError(f"{name} must be a real number, got {value!r}") from e
    numeric = arr.dtype.kind in "biuf" or jnp.issubdtype(arr.dtype, jnp.floating)  # bf16: "V"
    if arr.ndim != 0 or not numeric:
        raise TypeError(f"{name} must be a real scalar (or an Optax schedule), got {value!r}")
    x = float(arr)
    if math.isnan(x) or not ok(x):
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def check_rate(name: str, value: Any) -> None:
    check_scalar(name, value, lambda x: 0.0 < x <= 1.0, "in (0, 1]")


def check_nonnegative(name: str, value: Any, *, schedule_ok: bool = True) -> None:
    check_scalar(
        name,
        value,
        lambda x: x >= 0.0 and math.isfinite(x),
        "finite and >= 0",
        schedule_ok=schedule_ok,
    )


def check_beta(name: str, value: Any) -> None:
    check_scalar(name, value, lambda x: 0.0 <= x < 1.0, "in [0, 1)", schedule_ok=False)


def check_positive(name: str, value: Any, *, schedule_ok: bool = True) -> None:
    check_scalar(
        name,
        value,
        lambda x: x > 0.0 and math.isfinite(x),
        "finite and > 0",
        schedule_ok=schedule_ok,
    )


def as_dtype(name: str, dtype: Any) -> jnp.dtype:
    """``dtype`` as a NumPy dtype; an array is an error (not its dtype)."""
    if isinstance(dtype, (jax.Array, np.ndarray)):
        # optax.inject_hyperparams calls a dtype such as jnp.bfloat16 as if it were a schedule
        raise TypeError(
            f"{name} must be a dtype, got an array; with optax.inject_hyperparams pass "
            f"static_args=({name!r},)"
        )
    try:
        return jnp.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"{name} must be a dtype, got {dtype!r}") from e


def check_state_dtype(name: str, dtype: Any) -> jnp.dtype:
    """A floating dtype; ``None`` means float32."""
    if dtype is None:
        return jnp.dtype(jnp.float32)
    dt = as_dtype(name, dtype)
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"{name} must be a floating dtype (float32, bfloat16, ...), got {dt}")
    return dt


ROUNDINGS = ("nearest", "stochastic")


def check_rounding(name: str, rounding: Any, state_dtype: jnp.dtype) -> str:
    """``"nearest"`` or ``"stochastic"``; stochastic rounding is for bfloat16 state."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"{name} must be one of {ROUNDINGS}, got {rounding!r}")
    if rounding == "stochastic" and state_dtype != jnp.bfloat16:
        raise ValueError(
            f"{name}='stochastic' needs state_dtype=jnp.bfloat16 (it rounds float32 values to "
            f"bfloat16), got state_dtype {state_dtype}"
        )
    return rounding


def check_params(transform: str, updates: Any, params: Any) -> None:
    """Checks what a flip rule needs: params given, matching `updates`, floating dtypes."""
    if params is None:
        raise ValueError(
            f"{transform}: `params` is required (a flip rule needs the current binary "
            "weights); call `tx.update(grads, state, params)`."
        )
    check_same_structure(transform, updates, params)
    check_float_leaves(transform, params)


def check_same_structure(transform: str, updates: Any, params: Any, what: str = "`params`") -> None:
    """Raises ValueError when ``updates`` and ``params`` differ in structure or shapes."""
    ut, pt = jax.tree.structure(updates), jax.tree.structure(params)
    if ut != pt:
        raise ValueError(
            f"{transform}: the gradient tree and {what} do not match:\n"
            f"  gradients: {ut}\n  {what}: {pt}"
        )
    for (path, u), p in zip(
        jax.tree_util.tree_leaves_with_path(updates), jax.tree.leaves(params), strict=True
    ):
        if jnp.shape(u) != jnp.shape(p):
            raise ValueError(
                f"{transform}: gradient and {what} shapes differ at {path_str(path)}: "
                f"{jnp.shape(u)} vs {jnp.shape(p)}"
            )


def check_float_leaves(transform: str, params: Any) -> None:
    for path, p in jax.tree_util.tree_leaves_with_path(params):
        dt = p.dtype if isinstance(p, jax.ShapeDtypeStruct) else jnp.result_type(p)
        if not jnp.issubdtype(dt, jnp.floating):
            raise TypeError(
                f"{transform}: `params` leaf {path_str(path)} has dtype {dt}; binary "
                "weights must be stored in a floating dtype (float32, bfloat16, ...) "
                "holding +1/-1"
            )


def check_reset_every(name: str, value: Any) -> None:
    """None, or an int >= 1 (an integer array is accepted for `optax.inject_hyperparams`)."""
    if value is None or isinstance(value, jax.core.Tracer):
        return
    ok = not isinstance(value, bool) and jnp.ndim(value) == 0
    ok = ok and jnp.issubdtype(jnp.result_type(value), jnp.integer)
    if not ok or int(value) < 1:
        raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
