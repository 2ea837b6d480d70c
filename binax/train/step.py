"""The training and evaluation steps, compiled once with `jax.jit` over a device `Mesh`.

The model is used through Flax NNX's functional API: ``nnx.split`` turns it into a static
graph definition and two trees of arrays, the parameters (``nnx.Param``, binary kernels
included) and the rest (BatchNorm statistics and any other variables); the step ``nnx.merge``\\ s
them back, runs the model and returns the new trees. Everything the step carries is a pure
pytree of arrays, `TrainState`, so it can be sharded, donated and checkpointed as it is.

Sharding: the mesh has two axes, ``"data"`` and ``"model"``. The batch is split along
``"data"``; parameters are replicated, except that with ``model_parallel > 1`` the last axis of
every kernel of two or more dimensions whose size is divisible by it is split along
``"model"``. Each optimizer-state leaf gets exactly the sharding of the parameter it belongs
to, and XLA inserts the gradient all-reduce. Under `jit` the batch mean of a BatchNorm layer is
a mean over the *global* batch, whatever the number of devices.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import binax
from binax.partition import path_tuple

DATA, MODEL = "data", "model"


class TrainState(NamedTuple):
    """Everything training changes, as arrays: what a checkpoint holds.

    Attributes:
      params: the trainable parameters (``nnx.Param`` leaves of the model, as plain arrays).
      rest: the model's other variables (BatchNorm statistics, RNG streams if any).
      opt_state: the optimizer state.
      step: the number of optimizer steps taken (int32 scalar).
    """

    params: Any
    rest: Any
    opt_state: Any
    step: jax.Array


def make_mesh(num_devices: int | None = None, model_parallel: int = 1) -> Mesh:
    """A ``("data", "model")`` mesh over the first ``num_devices`` devices (all by default).

    In a multi-process run ``jax.devices()`` lists the devices of every process, so the mesh
    spans all hosts. The axes are `AxisType.Auto`: shardings are given at the `jit` boundary
    and XLA propagates them through the model.

    Raises:
      ValueError: ``num_devices`` out of range, or ``model_parallel`` does not divide it.
    """
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if not isinstance(n, int) or not 1 <= n <= len(devices):
        raise ValueError(f"num_devices must be in [1, {len(devices)}], got {num_devices!r}")
    if n != len(devices) and jax.process_count() > 1:
        raise ValueError("num_devices cannot be used in a multi-process run (it uses all devices)")
    if not isinstance(model_parallel, int) or model_parallel < 1 or n % model_parallel:
        raise ValueError(
            f"model_parallel must be a positive divisor of the number of devices ({n}), "
            f"got {model_parallel!r}"
        )
    return jax.make_mesh(
        (n // model_parallel, model_parallel),
        (DATA, MODEL),
        axis_types=(AxisType.Auto, AxisType.Auto),
        devices=devices[:n],
    )


def param_spec(shape: tuple[int, ...], mesh: Mesh) -> P:
    """The partition spec of a parameter: split its last axis over ``"model"`` when it can."""
    m = mesh.shape[MODEL]
    if m > 1 and len(shape) >= 2 and shape[-1] % m == 0:
        return P(*([None] * (len(shape) - 1)), MODEL)
    return P()


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """`NamedSharding` of every parameter leaf (see `param_spec`)."""
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(np.shape(x), mesh)), tree)


def state_shardings(opt_state: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """The sharding of each optimizer-state leaf: that of the parameter it belongs to.

    A state leaf belongs to a parameter when the parameter's key path ends its own key path
    and the shapes agree (Optax states nest copies of the parameter tree, e.g.
    ``inner_states/binary/inner_state/0/ema/layers/0/kernel``). Other leaves (step counts,
    scalars) are replicated.
    """
    by_path = {
        path_tuple(p): (np.shape(x), s)
        for (p, x), s in zip(
            jax.tree_util.tree_leaves_with_path(params),
            jax.tree.leaves(param_shardings),
            strict=True,
        )
    }
    lengths = sorted({len(k) for k in by_path}, reverse=True)
    replicated = NamedSharding(mesh, P())

    def pick(path, leaf):
        keys = path_tuple(path)
        for n in lengths:
            hit = by_path.get(keys[-n:]) if len(keys) >= n else None
            if hit is not None and hit[0] == np.shape(leaf):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, opt_state)


def hard_tanh(x: jax.Array) -> jax.Array:
    """``clip(x, -1, 1)``: the activation of the full-precision baseline (sign's surrogate)."""
    return jnp.clip(x, -1.0, 1.0)


def build_model(
    name: str,
    model_kwargs: dict[str, Any],
    input_shape: tuple[int, int, int],
    num_classes: int,
    seed: int,
    *,
    full_precision: bool = False,
) -> nnx.Module:
    """Builds a `binax.models` architecture.

    With ``full_precision=True`` the same architecture is built with real kernels (no kernel
    quantizer; the kernels keep their `BinaryParam` type, so flips are still counted) and
    `hard_tanh` in place of the sign activations.
    """
    from binax import models

    kwargs = dict(model_kwargs)
    if full_precision:
        kwargs.update(kernel_quantizer=None, input_quantizer=hard_tanh)
    return models.get(
        name, input_shape=tuple(input_shape), num_classes=num_classes, rngs=nnx.Rngs(seed), **kwargs
    )


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def zero_metrics(flip_names: tuple[str, ...]) -> dict[str, Any]:
    """The per-epoch accumulators the train step adds to."""
    return {
        "loss": jnp.zeros((), jnp.float32),
        "correct": jnp.zeros((), jnp.int32),
        "count": jnp.zeros((), jnp.int32),
        "flips": {name: jnp.zeros((), jnp.int32) for name in flip_names},
    }


def train_step(
    state: TrainState,
    metrics: dict[str, Any],
    images: jax.Array,
    labels: jax.Array,
    *,
    graphdef: Any,
    tx: optax.GradientTransformation,
    binary_mask: Any,
) -> tuple[TrainState, dict[str, Any]]:
    """One optimizer step on a (global) batch; adds loss, accuracy and flips to ``metrics``.

    The loss is the mean softmax cross-entropy over the batch (binax's thresholds assume a
    mean-reduced loss). Flips are counted per binary leaf as changes of ``sign0``.
    """

    def loss_fn(params):
        model = nnx.merge(graphdef, params, state.rest)
        logits = model(images)
        new_rest = nnx.as_pure(nnx.state(model, nnx.Not(nnx.Param)))
        return jnp.mean(_cross_entropy(logits, labels)), (logits, new_rest)

    (loss, (logits, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    flips = binax.flip_metrics(state.params, params, is_binary=binary_mask)
    n = labels.shape[0]
    metrics = {
        "loss": metrics["loss"] + loss * n,
        "correct": metrics["correct"] + jnp.sum(jnp.argmax(logits, -1) == labels),
        "count": metrics["count"] + n,
        "flips": {k: v + flips[f"flips/{k}"] for k, v in metrics["flips"].items()},
    }
    return TrainState(params, rest, opt_state, state.step + 1), metrics


def eval_step(
    state: TrainState,
    metrics: dict[str, Any],
    images: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    *,
    graphdef: Any,
) -> dict[str, Any]:
    """Adds the weighted loss and accuracy of a batch to ``metrics`` (weight 0: padding)."""
    model = nnx.merge(graphdef, state.params, state.rest)
    logits = model(images)
    correct = (jnp.argmax(logits, -1) == labels) * weights
    return {
        "loss": metrics["loss"] + jnp.sum(_cross_entropy(logits, labels) * weights),
        "correct": metrics["correct"] + jnp.sum(correct).astype(jnp.int32),
        "count": metrics["count"] + jnp.sum(weights).astype(jnp.int32),
        "flips": metrics["flips"],
    }


@dataclasses.dataclass
class Program:
    """A model, its optimizer and the compiled steps, over one mesh.

    Attributes:
      mesh: the device mesh.
      train_graphdef, eval_graphdef: the model's static structure in train and eval mode.
      tx: the optimizer.
      binary_mask: bools, ``True`` at the binary leaves of ``params``.
      flip_names: names (key paths) of the binary leaves, e.g. ``"layers/0/kernel"``.
      flip_sizes: their numbers of elements.
      state_sharding: a `TrainState` of shardings.
      batch_sharding: the sharding of a batch (split along ``"data"``).
      train_step: ``(state, metrics, images, labels) -> (state, metrics)``, jitted; donates
        ``state`` and ``metrics``.
      eval_step: ``(state, metrics, images, labels, weights) -> metrics``, jitted.
    """

    mesh: Mesh
    train_graphdef: Any
    eval_graphdef: Any
    tx: optax.GradientTransformation
    binary_mask: Any
    flip_names: tuple[str, ...]
    flip_sizes: tuple[int, ...]
    state_sharding: TrainState
    metrics_sharding: Any
    batch_sharding: NamedSharding
    train_step: Callable[..., Any]
    eval_step: Callable[..., Any]
    init_state: Callable[[], TrainState]

    def zero_metrics(self) -> dict[str, Any]:
        """Fresh accumulators, replicated over the mesh."""
        return jax.device_put(zero_metrics(self.flip_names), self.metrics_sharding)


def make_program(
    model: nnx.Module,
    make_tx: Callable[[Any], optax.GradientTransformation],
    mesh: Mesh,
    *,
    init_params: Callable[[Any, Any], Any] | None = None,
) -> Program:
    """Splits ``model``, builds the optimizer and the jitted steps over ``mesh``.

    Args:
      model: a Flax NNX model with `binax.nn.BinaryParam` kernels.
      make_tx: called with the binary label tree, returns the optimizer.
      mesh: from `make_mesh`.
      init_params: optional ``(params, binary_mask) -> params`` applied before the optimizer
        state is created (e.g. `binax.train.optim.latent_init`).
    """
    labels = binax.nn.binary_labels(model)
    model.train()
    train_graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    model.eval()
    eval_graphdef, _, _ = nnx.split(model, nnx.Param, ...)
    model.train()
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)
    mask = binax.binary_mask(labels, params)
    if init_params is not None:
        params = init_params(params, mask)
    tx = make_tx(labels)

    flip_names, flip_sizes = [], []
    for (path, x), m in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(mask), strict=True
    ):
        if m:
            flip_names.append("/".join(str(k) for k in path_tuple(path)))
            flip_sizes.append(int(np.size(x)))

    replicated = NamedSharding(mesh, P())
    param_sh = tree_shardings(params, mesh)
    abstract_opt = jax.eval_shape(tx.init, params)
    state_sh = TrainState(
        params=param_sh,
        rest=jax.tree.map(lambda _: replicated, rest),
        opt_state=state_shardings(abstract_opt, params, param_sh, mesh),
        step=replicated,
    )
    metrics_sh = jax.tree.map(lambda _: replicated, zero_metrics(tuple(flip_names)))
    batch_sh = NamedSharding(mesh, P(DATA))

    def init_state() -> TrainState:
        # Every process builds the same initial values (same seed); each places its part.
        p = jax.tree.map(_global_array, params, param_sh)
        r = jax.tree.map(_global_array, rest, state_sh.rest)
        opt_state = jax.jit(tx.init, out_shardings=state_sh.opt_state)(p)
        return TrainState(p, r, opt_state, _global_array(np.zeros((), np.int32), replicated))

    train = jax.jit(
        functools.partial(train_step, graphdef=train_graphdef, tx=tx, binary_mask=mask),
        in_shardings=(state_sh, metrics_sh, batch_sh, batch_sh),
        out_shardings=(state_sh, metrics_sh),
        donate_argnums=(0, 1),
    )
    evaluate = jax.jit(
        functools.partial(eval_step, graphdef=eval_graphdef),
        in_shardings=(state_sh, metrics_sh, batch_sh, batch_sh, batch_sh),
        out_shardings=metrics_sh,
        donate_argnums=(1,),
    )
    return Program(
        mesh=mesh,
        train_graphdef=train_graphdef,
        eval_graphdef=eval_graphdef,
        tx=tx,
        binary_mask=mask,
        flip_names=tuple(flip_names),
        flip_sizes=tuple(flip_sizes),
        state_sharding=state_sh,
        metrics_sharding=metrics_sh,
        batch_sharding=batch_sh,
        train_step=train,
        eval_step=evaluate,
        init_state=init_state,
    )


def _global_array(value: Any, sharding: NamedSharding) -> jax.Array:
    """A global array from a value every process holds in full."""
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(x: Any) -> Any:
    """A replicated array (or tree of them) as NumPy, also when other processes share it."""

    def one(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return np.asarray(a.addressable_data(0))
        return np.asarray(a)

    return jax.tree.map(one, x)


def process_rows(sharding: NamedSharding, global_rows: int) -> tuple[int, int]:
    """Which contiguous block of a global batch this process must supply.

    Returns ``(index, count)``: the process supplies rows ``index * global_rows // count`` to
    ``(index + 1) * global_rows // count``, which is what ``binax.data.batches(...,
    process_index=index, process_count=count)`` yields. Read off the sharding, so it is right
    whatever the order of the devices in the mesh (two processes that hold the same rows, as
    with a ``"model"`` axis across hosts, get the same block).
    """
    index_map = sharding.addressable_devices_indices_map((global_rows,))
    spans = {
        (s[0].start or 0, global_rows if s[0].stop is None else s[0].stop)
        for s in index_map.values()
    }
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    rows = hi - lo
    covered = sum(b - a for a, b in spans)
    if covered != rows or global_rows % rows:
        raise ValueError(
            "this process's devices do not hold one contiguous block of the batch; use a "
            "mesh from binax.train.make_mesh"
        )
    return lo // rows, global_rows // rows


def global_batch(sharding: NamedSharding, local: np.ndarray, global_rows: int) -> jax.Array:
    """The global array of a batch from this process's rows (`process_rows`)."""
    shape = (global_rows, *local.shape[1:])
    return jax.make_array_from_process_local_data(sharding, local, shape)
