"""A BNN-aware model summary: parameters by precision, deployable memory, binary vs real MACs.

In the spirit of Larq's ``larq.models.summary`` (larq/larq ``larq/models.py``). Memory counts
*deployable* bits: a binary kernel (`binax.nn.BinaryParam`) costs 1 bit per weight, every other
value 32 bits, and a BatchNorm layer is counted as it is deployed, folded into a per-channel scale
and shift (2 values per channel, whatever it stores), as Larq counts its fused pairs. Training
needs more (latent weights, optimizer state); this is the size of the trained network.

Multiply-accumulates (MACs) come from a shape-only trace of the forward pass
(`jax.eval_shape`, nothing is computed) with each layer's output shape taken from
`flax.nnx.capture`: a layer with kernel ``K`` (last axis = output features) and output ``y`` does
``y.size * K.size / K.shape[-1]`` MACs. They are binary (XNOR-popcount) MACs when the kernel is
binary and the layer binarizes its input (a 1-bit ``input_quantizer``), real MACs otherwise.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from binax import quantizers as q
from binax._ops import path_str
from binax.nn import BinaryParam, FixedScale

__all__ = ["ModelSummary", "summary"]

_COUNTED = (nnx.Param, nnx.BatchStat, FixedScale)


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    """The result of `summary`: one dict per layer and a dict of totals.

    Each layer dict has ``path``, ``type``, ``input_precision`` (1, 32 or None),
    ``output_shape`` (or None), ``params_1bit``, ``params_32bit`` (trainable),
    ``non_trainable`` (BatchNorm statistics, fixed scales), ``memory_bits``, ``memory_kb``,
    ``binary_macs`` and ``real_macs`` (None without an input shape).

    ``totals`` has ``params_1bit``, ``params_32bit``, ``trainable``, ``non_trainable``,
    ``total_params``, ``memory_bits``, ``memory_kb``, ``float32_bits``, ``float32_kb``,
    ``compression_ratio`` (float32 / deployable memory), ``binary_macs``, ``real_macs``,
    ``total_macs`` and ``binary_mac_ratio`` (the MAC entries None without an input shape).
    """

    layers: list[dict[str, Any]]
    totals: dict[str, Any]

    def __str__(self) -> str:
        return _format(self)


def _size(var: nnx.Variable) -> int:
    return int(math.prod(jnp.shape(var.get_value())))


def _own_variables(module: nnx.Module) -> dict[str, nnx.Variable]:
    return {k: v for k, v in vars(module).items() if isinstance(v, _COUNTED)}


def _input_precision(module: nnx.Module, has_kernel: bool) -> int | None:
    if hasattr(module, "input_quantizer"):
        return q.precision(module.input_quantizer)
    return 32 if has_kernel else None


def _output_shapes(model: nnx.Module, input_shape, dtype) -> dict[str, tuple[int, list]]:
    """Output shapes of every module call, by module path, from a shape-only trace.

    Returns ``{path: (order, [shape per call])}``, ``order`` being the position in the traced
    program of the operation that produced the module's first output (the execution order).
    """
    graphdef, state = nnx.split(model)

    def forward(state, x):
        m = nnx.merge(graphdef, state)  # a copy: BatchNorm updates do not touch ``model``
        _, captured = nnx.capture(m, nnx.Intermediate, method_outputs=nnx.Intermediate)(x)
        outputs = {}  # module path -> first array of each call's output
        for path, value in nnx.to_flat_state(captured):
            if path and path[-1] == "__call__":
                calls = value.get_value() if isinstance(value, nnx.Variable) else value
                firsts = [jax.tree.leaves(c)[0] for c in calls if jax.tree.leaves(c)]
                outputs[path_str(path[:-1])] = firsts
        return outputs

    spec = jax.ShapeDtypeStruct(tuple(input_shape), dtype)
    closed, outputs = jax.make_jaxpr(forward, return_shape=True)(state, spec)
    producer = {}
    for i, eqn in enumerate(closed.jaxpr.eqns):
        for v in eqn.outvars:
            producer[v] = i
    leaves, treedef = jax.tree.flatten(outputs)
    orders = jax.tree.unflatten(
        treedef, [producer.get(v, -1) for v in closed.jaxpr.outvars[: len(leaves)]]
    )
    return {
        path: (min(orders[path], default=len(producer)), [tuple(o.shape) for o in outs])
        for path, outs in outputs.items()
    }


def summary(
    model: nnx.Module,
    input_shape: Sequence[int] | None = None,
    *,
    dtype: Any = jnp.float32,
    print_fn: Callable[[str], Any] | None = print,
) -> ModelSummary:
    """Summarises a Flax NNX model: per-layer parameters by precision, memory, MACs.

    Args:
      model: an NNX module, called as ``model(x)`` for the MAC count.
      input_shape: the shape of ``x`` including the batch axis, e.g. ``(1, 32, 32, 3)``; MACs are
        counted for that batch (use batch 1 for per-example MACs). ``None`` skips MACs.
      dtype: dtype of the traced input.
      print_fn: called with the formatted table; ``None`` prints nothing.

    Returns:
      A `ModelSummary` (``layers``: list of per-layer dicts, ``totals``: dict).

    Raises:
      ValueError: ``model`` is not an `nnx.Module`.
    """
    if not isinstance(model, nnx.Module):
        raise ValueError(f"summary: model must be an nnx.Module, got {type(model).__name__}")
    shapes = _output_shapes(model, input_shape, dtype) if input_shape is not None else None

    layers = []
    for path, module in nnx.iter_modules(model):
        own = _own_variables(module)
        if not own:
            continue
        kernel = own.get("kernel")
        has_kernel = kernel is not None and len(jnp.shape(kernel.get_value())) >= 2
        in_prec = _input_precision(module, has_kernel)
        p1 = sum(_size(v) for v in own.values() if isinstance(v, BinaryParam))
        p32 = sum(
            _size(v)
            for v in own.values()
            if isinstance(v, nnx.Param) and not isinstance(v, BinaryParam)
        )
        non_trainable = sum(_size(v) for v in own.values() if not isinstance(v, nnx.Param))
        if isinstance(module, nnx.BatchNorm):
            real_values = 2 * module.num_features  # folded scale and shift
        else:
            real_values = p32 + non_trainable
        row: dict[str, Any] = {
            "path": path_str(path),
            "type": type(module).__name__,
            "input_precision": in_prec,
            "output_shape": None,
            "params_1bit": p1,
            "params_32bit": p32,
            "non_trainable": non_trainable,
            "memory_bits": p1 + 32 * real_values,
            "float32_bits": 32 * (p1 + real_values),
            "binary_macs": None,
            "real_macs": None,
        }
        row["memory_kb"] = row["memory_bits"] / 8 / 1024
        if shapes is not None:
            order, outs = shapes.get(row["path"], (len(layers) + 10**9, []))
            row["order"] = order
            row["output_shape"] = outs[0] if outs else None
            macs = 0
            if has_kernel:
                k_shape = jnp.shape(kernel.get_value())
                per_output = math.prod(k_shape) // k_shape[-1]
                macs = sum(math.prod(s) * per_output for s in outs)
            binary = isinstance(kernel, BinaryParam) and in_prec == 1
            row["binary_macs"] = macs if binary else 0
            row["real_macs"] = 0 if binary else macs
        layers.append(row)

    def total(key):
        return sum(r[key] for r in layers)

    memory_bits, float32_bits = total("memory_bits"), total("float32_bits")
    totals: dict[str, Any] = {
        "params_1bit": total("params_1bit"),
        "params_32bit": total("params_32bit"),
        "trainable": total("params_1bit") + total("params_32bit"),
        "non_trainable": total("non_trainable"),
        "memory_bits": memory_bits,
        "memory_kb": memory_bits / 8 / 1024,
        "float32_bits": float32_bits,
        "float32_kb": float32_bits / 8 / 1024,
        "compression_ratio": float32_bits / memory_bits if memory_bits else float("nan"),
        "binary_macs": None,
        "real_macs": None,
        "total_macs": None,
        "binary_mac_ratio": None,
    }
    totals["total_params"] = totals["trainable"] + totals["non_trainable"]
    if shapes is not None:
        b, r = total("binary_macs"), total("real_macs")
        totals.update(
            binary_macs=b,
            real_macs=r,
            total_macs=b + r,
            binary_mac_ratio=b / (b + r) if b + r else float("nan"),
        )
    if shapes is not None:  # execution order
        layers.sort(key=lambda row: row["order"])
    for row in layers:
        del row["float32_bits"]
        row.pop("order", None)
    result = ModelSummary(layers=layers, totals=totals)
    if print_fn is not None:
        print_fn(str(result))
    return result


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.2f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _format(s: ModelSummary) -> str:
    header = [
        "Layer",
        "Type",
        "In bits",
        "Output shape",
        "1-bit params",
        "32-bit params",
        "Memory (kB)",
        "1-bit MACs",
        "32-bit MACs",
    ]
    rows = [
        [
            r["path"],
            r["type"],
            _fmt(r["input_precision"]),
            "-" if r["output_shape"] is None else str(r["output_shape"]),
            _fmt(r["params_1bit"]),
            _fmt(r["params_32bit"] + r["non_trainable"]),
            _fmt(r["memory_kb"]),
            _fmt(r["binary_macs"]),
            _fmt(r["real_macs"]),
        ]
        for r in s.layers
    ]
    t = s.totals
    rows.append(
        [
            "Total",
            "",
            "",
            "",
            _fmt(t["params_1bit"]),
            _fmt(t["params_32bit"] + t["non_trainable"]),
            _fmt(t["memory_kb"]),
            _fmt(t["binary_macs"]),
            _fmt(t["real_macs"]),
        ]
    )
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells):
        cells = zip(cells, widths, strict=True)
        return "  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(cells))

    rule = "-" * len(line(header))
    out = [rule, line(header), rule, *(line(r) for r in rows[:-1]), rule, line(rows[-1]), rule]
    out += [
        f"Total params: {t['total_params']:,} ({t['trainable']:,} trainable: "
        f"{t['params_1bit']:,} 1-bit, {t['params_32bit']:,} 32-bit; "
        f"{t['non_trainable']:,} non-trainable)",
        f"Model size (deployable): {t['memory_kb']:.2f} kB "
        "(1 bit per binary weight, 32 bits per real value, BatchNorm folded)",
        f"Float-32 equivalent: {t['float32_kb']:.2f} kB",
        f"Compression ratio of memory: {t['compression_ratio']:.2f}",
    ]
    if t["total_macs"] is not None:
        out += [
            f"Number of MACs: {t['total_macs']:,} ({t['binary_macs']:,} binary, "
            f"{t['real_macs']:,} 32-bit)",
            f"Ratio of MACs that are binarized: {t['binary_mac_ratio']:.4f}",
        ]
    return "\n".join(out)
