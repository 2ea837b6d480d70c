"""The training and evaluation steps, compiled once with `jax.jit` over a device `Mesh`, on
the model ``nnx.split`` into a static graph and arrays (`TrainState`: sharded, donated and
checkpointed as it is)."""

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
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import binax
from binax._ops import path_str
from binax.models import distillation_loss, outputs
from binax.train.sharding import DATA, state_shardings, tree_shardings


class TrainState(NamedTuple):
    """Everything training changes, as arrays (what a checkpoint holds): ``params`` (the model's
    ``nnx.Param`` leaves), ``rest`` (BatchNorm statistics, RNG streams), ``opt_state`` and
    ``step`` (optimizer steps taken, an int32 scalar)."""

    params: Any
    rest: Any
    opt_state: Any
    step: jax.Array


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


class Distillation(NamedTuple):
    """A frozen teacher to distil from: its eval-mode ``graphdef``, its arrays (``params``,
    ``rest``: never trained nor checkpointed) and `distillation_loss`'s keyword ``options``."""

    graphdef: Any
    params: Any
    rest: Any
    options: dict[str, float]


DISTILL_TERMS = ("logits", "attention", "hidden")


def train_step(
    state: TrainState,
    metrics: dict[str, Any],
    images: jax.Array,
    labels: jax.Array,
    teacher: tuple[Any, Any] | None = None,
    *,
    graphdef: Any,
    tx: optax.GradientTransformation,
    binary_mask: Any,
    distill: Distillation | None = None,
) -> tuple[TrainState, dict[str, Any]]:
    """One optimizer step on a (global) batch; adds loss, accuracy and flips (changes of
    ``sign0`` per binary leaf) to ``metrics``. The loss is the batch's mean softmax cross-entropy
    (binax's thresholds assume a mean), plus with ``distill`` the `distillation_loss` against the
    ``teacher``'s ``(params, rest)``, whose unweighted terms go to ``metrics["distill"]``."""

    def loss_fn(params):
        model = nnx.merge(graphdef, params, state.rest)
        out, extra, parts = outputs(model, images, distill is not None), 0.0, {}
        if distill is not None:
            target = outputs(nnx.merge(distill.graphdef, *teacher), images)
            extra, parts = distillation_loss(out, target, **distill.options)
        task = jnp.mean(_cross_entropy(out.logits, labels))
        new_rest = nnx.as_pure(nnx.state(model, nnx.Not(nnx.Param)))
        return task + extra, (task, out.logits, parts, new_rest)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, (loss, logits, parts, rest)), grads = grad_fn(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    n = labels.shape[0]
    metrics = _add(metrics, loss * n, jnp.argmax(logits, -1) == labels, n)
    if metrics["flips"]:  # empty for a full-precision twin, which has no binary leaf
        flips = binax.flip_metrics(state.params, params, is_binary=binary_mask)
        metrics["flips"] = {k: v + flips[f"flips/{k}"] for k, v in metrics["flips"].items()}
    if parts:
        metrics["distill"] = {k: v + parts[k] * n for k, v in metrics["distill"].items()}
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
    """Adds the weighted loss and accuracy of a batch to ``metrics`` (weight 0: padding), and
    its confusion matrix (true class, predicted class) if ``metrics`` has one."""
    logits = nnx.merge(graphdef, state.params, state.rest)(images)
    losses = _cross_entropy(logits, labels) * weights
    predicted = jnp.argmax(logits, -1)
    out = _add(metrics, jnp.sum(losses), (predicted == labels) * weights, weights)
    if "confusion" in metrics:
        out["confusion"] = metrics["confusion"].at[labels, predicted].add(weights.astype(jnp.int32))
    return out


def _add(metrics: dict[str, Any], loss: jax.Array, correct: jax.Array, count: Any) -> dict:
    """``metrics`` with a batch's summed loss, correct predictions and example count added."""
    return metrics | {
        "loss": metrics["loss"] + loss,
        "correct": metrics["correct"] + jnp.sum(correct).astype(jnp.int32),
        "count": metrics["count"] + jnp.sum(count).astype(jnp.int32),
    }


@dataclasses.dataclass
class Program:
    """A model, its optimizer ``tx`` and the compiled steps, over one ``mesh``: the model's
    ``eval_graphdef`` (eval mode), ``binary_mask`` (``True`` at the binary parameter leaves),
    their key paths and sizes (``flip_names``: ``"layers/0/kernel"``..., ``flip_sizes``), the
    ``batch_sharding`` (along ``"data"``), `train_step` and `eval_step` jitted without their
    keyword arguments (the train step donates ``state`` and ``metrics``), ``init_state()`` (the
    initial `TrainState`, on the mesh), and ``distill``: the step distils (`Distillation`)."""

    mesh: Mesh
    eval_graphdef: Any
    tx: optax.GradientTransformation
    binary_mask: Any
    flip_names: tuple[str, ...]
    flip_sizes: tuple[int, ...]
    batch_sharding: NamedSharding
    train_step: Callable[..., Any]
    eval_step: Callable[..., Any]
    init_state: Callable[[], TrainState]
    distill: bool = False

    def zero_metrics(self, confusion: int = 0) -> dict[str, Any]:
        """The per-epoch accumulators of the steps, zeros replicated over the mesh; with
        ``confusion=C`` a ``(C, C)`` confusion matrix as well (`eval_step` fills it)."""
        metrics = {"loss": np.float32(0), "correct": np.int32(0), "count": np.int32(0)}
        metrics["flips"] = {name: np.int32(0) for name in self.flip_names}
        if self.distill:
            metrics["distill"] = {k: np.float32(0) for k in DISTILL_TERMS}
        if confusion:
            metrics["confusion"] = np.zeros((confusion, confusion), np.int32)
        return jax.device_put(metrics, NamedSharding(self.mesh, P()))


def make_program(
    model: nnx.Module,
    make_tx: Callable[[Any], optax.GradientTransformation],
    mesh: Mesh,
    *,
    init_params: Callable[[Any, Any], Any] | None = None,
    distill: Distillation | None = None,
) -> Program:
    """Splits ``model`` (Flax NNX, `binax.nn.BinaryParam` kernels), builds the optimizer
    (``make_tx(binary_labels)``) and the jitted steps over ``mesh``. ``init_params``,
    ``(params, binary_mask) -> params``, is applied before the optimizer state is created (e.g.
    `binax.train.model.latent_init`); a ``distill`` teacher's arrays are placed once."""
    labels = binax.nn.binary_labels(model)
    model.eval()
    eval_graphdef = nnx.graphdef(model)
    model.train()
    train_graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)
    # a full-precision twin (the "real" baseline of a transformer) has no binary leaf
    mask = jax.tree.map(lambda _: False, params)
    if any(jax.tree.leaves(labels)):
        mask = binax.binary_mask(labels, params)
    if init_params is not None:
        params = init_params(params, mask)
    tx = make_tx(labels)
    leaves = zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(mask), strict=True)
    binary = {path_str(p): int(np.size(x)) for (p, x), m in leaves if m}  # flip names: sizes

    replicated, batch_sh = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA))
    param_sh = tree_shardings(params, mesh)
    opt_sh = state_shardings(tx, params, param_sh, mesh)
    state_sh = TrainState(param_sh, replicated, opt_sh, replicated)  # replicated: a tree prefix

    def init_state() -> TrainState:
        # Every process builds the same initial values (same seed); each places its part.
        p, r = jax.device_put((params, rest), (param_sh, replicated))
        opt_state = jax.jit(tx.init, out_shardings=opt_sh)(p)
        return TrainState(p, r, opt_state, jax.device_put(np.zeros((), np.int32), replicated))

    step = functools.partial(train_step, graphdef=train_graphdef, tx=tx, binary_mask=mask)
    in_sh = (state_sh, replicated, batch_sh, batch_sh)
    if distill is not None:  # the teacher's arrays: placed once, an argument of every step
        teacher_sh = (tree_shardings(distill.params, mesh), replicated)
        teacher = jax.device_put((distill.params, distill.rest), teacher_sh)
        step = functools.partial(step, distill=distill._replace(params=None, rest=None))
        in_sh += (teacher_sh,)
    out_sh = (state_sh, replicated)
    jitted = jax.jit(step, in_shardings=in_sh, out_shardings=out_sh, donate_argnums=(0, 1))
    train = jitted if distill is None else lambda *batch: jitted(*batch, teacher)
    eval_sh = (state_sh, replicated, batch_sh, batch_sh, batch_sh)
    evaluate = functools.partial(eval_step, graphdef=eval_graphdef)
    evaluate = jax.jit(evaluate, in_shardings=eval_sh, out_shardings=replicated, donate_argnums=1)
    names, sizes, distills = tuple(binary), tuple(binary.values()), distill is not None
    return Program(
        mesh, eval_graphdef, tx, mask, names, sizes, batch_sh, train, evaluate, init_state, distills
    )
