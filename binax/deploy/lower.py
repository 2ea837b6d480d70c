"""From a trained NNX model to a deployed program (`binax.deploy.program`).

Each architecture has a *lowering*: a function ``(model) -> (program, arrays)`` that lists its
layers in order. The reference models (`binax.models`) and `flax.nnx.Sequential` models are
built in; `register` adds one for a user's own class; `from_linen` turns a Linen
``Sequential`` into its NNX twin. Layers are lowered one by one by
`lower_layer`, which turns a binax layer into ``sign`` (its input quantizer), an integer or float
product, and an ``affine`` epilogue (its scale and bias).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
from flax import nnx

from binax import quantizers as q
from binax.deploy import program as P
from binax.nn import BinaryConv, BinaryLinear

__all__ = ["from_linen", "lower", "lower_layer", "register"]

Lowering = Callable[[nnx.Module], tuple[list, list]]
_LOWERINGS: dict[type, Lowering] = {}

# Quantizers whose forward value is exactly sign0 (+1 at and above 0, else -1).
_SIGNS = (q.ste_sign, q.approx_sign, q.swish_sign)


def register(cls: type, lowering: Lowering) -> None:
    """Teaches `binax.deploy.compile` a model class.

    ``lowering(model)`` returns ``(program, arrays)``: two lists, usually built by concatenating
    the results of `lower_layer` for each layer in the order the model calls them, plus
    ``{"op": "flatten"}``, ``{"op": "maxpool", ...}`` etc. nodes (`binax.deploy.program`).
    """
    if not isinstance(cls, type) or not callable(lowering):
        raise ValueError("register: cls must be a class and lowering a callable")
    _LOWERINGS[cls] = lowering


def _unwrap(f):
    while isinstance(f, functools.partial):
        f = f.func
    return f


def _is_sign(quantizer) -> bool:
    return _unwrap(quantizer) in _SIGNS


def _np(var) -> np.ndarray:
    return np.asarray(var[...], np.float32)


def _value(var) -> np.ndarray | None:
    return None if var is None else _np(var)


def _layer_name(module) -> str:
    return type(module).__name__


def _kernel_arrays(module, kernel: np.ndarray, binary: bool) -> dict:
    if binary:
        return {"bits": P.pack_kernel(kernel)}
    return {"kernel": kernel}


def lower_layer(module: nnx.Module) -> tuple[list, list]:
    """The nodes of one layer: `binax.nn.BinaryLinear`, `binax.nn.BinaryConv`, `flax.nnx.Linear`,
    `flax.nnx.Conv`, `flax.nnx.BatchNorm`.

    A binax layer whose input quantizer is a sign (``ste_sign``, ``approx_sign``,
    ``swish_sign``) and whose kernel is binary (a sign quantizer, or no quantizer on a kernel of
    exactly ±1) becomes ``sign`` + an integer product; with a real input or a real kernel it
    stays a float product (a binary kernel still stored as bits).

    Raises:
      ValueError: a layer or quantizer that has no deployed form (named in the message).
    """
    name = _layer_name(module)
    if isinstance(module, (BinaryLinear, BinaryConv)):
        return _lower_binary(module)
    if isinstance(module, nnx.BatchNorm):
        if module.axis not in (-1, (-1,)):
            raise ValueError(f"{name}: only BatchNorm over the last axis, unsharded, is deployable")
        arrays = {"mean": _np(module.mean), "var": _np(module.var)}
        if module.scale is not None:
            arrays["scale"] = _np(module.scale)
        if module.bias is not None:
            arrays["bias"] = _np(module.bias)
        return [{"op": "batchnorm", "epsilon": float(module.epsilon)}], [arrays]
    if isinstance(module, nnx.Linear):
        arrays = {"kernel": _np(module.kernel)}
        if module.bias is not None:
            arrays["bias"] = _np(module.bias)
        node = {"op": "dense", "kernel_shape": list(arrays["kernel"].shape)}
        return [node], [arrays]
    if isinstance(module, nnx.Conv):
        if (
            any(d != 1 for d in np.atleast_1d(module.input_dilation or 1))
            or module.mask is not None
        ):
            raise ValueError(f"{name}: input_dilation and mask are not deployable")
        padding = module.padding
        if isinstance(padding, str) and padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"{name}: padding {padding!r} is not deployable (SAME, VALID, pairs)")
        kernel = _np(module.kernel)
        n = kernel.ndim - 2
        arrays = {"kernel": kernel}
        if module.bias is not None:
            arrays["bias"] = _np(module.bias)
        node = _conv_node(
            "conv",
            kernel.shape,
            module.strides or 1,
            padding,
            module.kernel_dilation or 1,
            module.feature_group_count,
            None,
            n,
        )
        return [node], [arrays]
    raise ValueError(
        f"{name}: no deployed form (deployable layers: BinaryLinear, BinaryConv, nnx.Linear, "
        "nnx.Conv, nnx.BatchNorm); for a model class of your own, use binax.deploy.register"
    )


def _json_padding(padding):
    if isinstance(padding, (str, int)):
        return padding
    return [p if isinstance(p, int) else [int(v) for v in p] for p in padding]


def _conv_node(op, shape, strides, padding, dilation, groups, pad_value, n) -> dict:
    from binax.nn.functional import ntuple

    return {
        "op": op,
        "kernel_shape": [int(d) for d in shape],
        "strides": list(ntuple(strides, n, "strides")),
        "padding": _json_padding(padding),
        "dilation": list(ntuple(dilation, n, "kernel_dilation")),
        "groups": int(groups),
        "pad_value": pad_value,
    }


def _lower_binary(module) -> tuple[list, list]:
    name = _layer_name(module)
    in_q, k_q = module.input_quantizer, module.kernel_quantizer
    if in_q is not None and not _is_sign(in_q):
        raise ValueError(
            f"{name}: input_quantizer {getattr(_unwrap(in_q), '__name__', in_q)!r} has no "
            "deployed form (deployable: None, ste_sign, approx_sign, swish_sign)"
        )
    kernel = _np(module.kernel)
    if k_q is not None and not _is_sign(k_q):
        raise ValueError(
            f"{name}: kernel_quantizer {getattr(_unwrap(k_q), '__name__', k_q)!r} has no "
            "deployed form (deployable: None, ste_sign, approx_sign, swish_sign)"
        )
    if k_q is not None:
        binary = True
        kernel = np.where(kernel >= 0, 1.0, -1.0).astype(np.float32)
    else:
        binary = bool(module.binary_kernel and np.all(np.abs(kernel) == 1))
    if module.dtype not in (None, np.float32) or module.param_dtype != np.float32:
        raise ValueError(f"{name}: only float32 layers are deployable (dtype, param_dtype)")
    sign_in = in_q is not None
    integer = sign_in and binary
    nodes, arrays = [], []
    if sign_in:
        nodes.append({"op": "sign"})
        arrays.append({})
    kind = "dense" if isinstance(module, BinaryLinear) else "conv"
    op = f"int_{kind}" if integer else kind
    if kind == "dense":
        node = {"op": op, "kernel_shape": list(kernel.shape)}
    else:
        n = len(module.kernel_size)
        pad = module.pad_value
        node = _conv_node(
            op,
            kernel.shape,
            module.strides,
            module.padding,
            module.kernel_dilation,
            module.feature_group_count,
            pad,
            n,
        )
    nodes.append(node)
    arrays.append(_kernel_arrays(module, kernel, binary))
    epilogue = {}
    if module.scale is not None:
        epilogue["scale"] = _np(module.scale)
    if module.bias is not None:
        epilogue["bias"] = _np(module.bias)
    if epilogue:
        nodes.append({"op": "affine"})
        arrays.append(epilogue)
    return nodes, arrays


def _concat(*parts: tuple[list, list]) -> tuple[list, list]:
    nodes, arrays = [], []
    for n, a in parts:
        nodes.extend(n)
        arrays.extend(a)
    return nodes, arrays


def _node(op: str, **fields: Any) -> tuple[list, list]:
    return [{"op": op, **fields}], [{}]


def _maxpool(window, strides, padding) -> tuple[list, list]:
    return _node("maxpool", window=list(window), strides=list(strides), padding=padding)


def _lower_mlp(model) -> tuple[list, list]:
    parts = [_node("flatten")]
    for layer, norm in zip(model.layers, model.norms, strict=True):
        parts += [lower_layer(layer), lower_layer(norm)]
    return _concat(*parts)


def _lower_binarynet(model) -> tuple[list, list]:
    parts = []
    for conv, norm, pool in zip(model.convs, model.conv_norms, model.pools, strict=True):
        parts.append(lower_layer(conv))
        if pool:
            parts.append(_maxpool((2, 2), (2, 2), "VALID"))
        parts.append(lower_layer(norm))
    parts.append(_node("flatten"))
    for layer, norm in zip(model.dense, model.dense_norms, strict=True):
        parts += [lower_layer(layer), lower_layer(norm)]
    return _concat(*parts)


def _lower_birealblock(block) -> tuple[list, list]:
    if block.downsample is None:
        shortcut = ([], [])
    else:
        parts = []
        if block.stride != 1:
            s = [block.stride, block.stride]
            parts.append(
                _node("avgpool", window=s, strides=s, padding="SAME", count_include_pad=False)
            )
        parts += [lower_layer(block.downsample), lower_layer(block.downsample_bn)]
        shortcut = _concat(*parts)
    first = _concat(lower_layer(block.conv1), lower_layer(block.bn1))
    second = _concat(lower_layer(block.conv2), lower_layer(block.bn2))
    return _concat(_residual(first, shortcut), _residual(second, ([], [])))


def _residual(body, shortcut) -> tuple[list, list]:
    return (
        [{"op": "residual", "body": body[0], "shortcut": shortcut[0]}],
        [{"body": body[1], "shortcut": shortcut[1]}],
    )


def _lower_resnet18(model) -> tuple[list, list]:
    parts = [lower_layer(model.stem), lower_layer(model.stem_bn)]
    if model.stem_type == "imagenet":
        parts.append(_maxpool((3, 3), (2, 2), "SAME"))
    parts += [_lower_birealblock(b) for b in model.blocks]
    parts += [_node("mean"), lower_layer(model.head)]
    return _concat(*parts)


def _lower_sequential(model) -> tuple[list, list]:
    parts = []
    for i, layer in enumerate(model.layers):
        f = _unwrap(layer)
        if isinstance(layer, nnx.Module):
            parts.append(lower(layer))
        elif f is nnx.max_pool and isinstance(layer, functools.partial):
            # nnx.max_pool(inputs, window_shape, strides=None, padding="VALID"); its default
            # strides are 1, not the window.
            kw = layer.keywords
            window = kw.get("window_shape")
            if layer.args or window is None:
                raise ValueError(
                    f"Sequential layer {i}: give max_pool's window_shape (and strides, padding) "
                    "by keyword: functools.partial(nnx.max_pool, window_shape=...)"
                )
            strides = kw.get("strides") or (1,) * len(window)
            parts.append(_maxpool(window, strides, _json_padding(kw.get("padding", "VALID"))))
        else:
            raise ValueError(
                f"Sequential layer {i} ({layer!r}) has no deployed form: use binax layers, "
                "nnx.Linear/Conv/BatchNorm, functools.partial(nnx.max_pool, ...), or "
                "binax.deploy.register for a model class of your own"
            )
    return _concat(*parts)


def lower(model: nnx.Module) -> tuple[list, list]:
    """``(program, arrays)`` of ``model`` (a registered class, or a single deployable layer)."""
    for cls in type(model).__mro__:
        if cls in _LOWERINGS:
            return _LOWERINGS[cls](model)
    return lower_layer(model)


def _register_builtins() -> None:
    from binax.models import BinaryMLP, BinaryNet, BinaryResNet18, BiRealBlock

    register(BinaryMLP, _lower_mlp)
    register(BinaryNet, _lower_binarynet)
    register(BinaryResNet18, _lower_resnet18)
    register(BiRealBlock, _lower_birealblock)
    register(nnx.Sequential, _lower_sequential)


_register_builtins()


def from_linen(module, variables) -> nnx.Module:
    """An NNX `flax.nnx.Sequential` equal to a Linen `flax.linen.Sequential` and its variables.

    The layers may be `binax.linen.BinaryDense`, `binax.linen.BinaryConv`, `flax.linen.Dense`,
    `flax.linen.Conv`, `flax.linen.BatchNorm` (its running statistics are used) and
    ``functools.partial(flax.linen.max_pool, ...)``; each becomes its `binax.nn` / `flax.nnx`
    twin with the same parameters, so `binax.deploy.compile` deploys it like an NNX model.

    Raises:
      ValueError: not a Linen ``Sequential``, or a layer without an NNX twin here.
    """
    import flax.linen as nn

    from binax import linen as bl
    from binax import nn as bnn

    if not isinstance(module, nn.Sequential):
        raise ValueError(
            f"from_linen: module must be a flax.linen.Sequential, got {type(module).__name__}"
        )
    bound = module.bind(variables)
    rngs = nnx.Rngs(0)
    layers = []
    for i, layer in enumerate(bound.layers):
        if not isinstance(layer, nn.Module):
            layers.append(layer)  # functions (max_pool partials) are taken as they are
            continue
        v = layer.variables
        params = v.get("params", {})

        def put(var, value):
            var[...] = np.asarray(value, np.float32)

        if isinstance(layer, (bl.BinaryDense, bl.BinaryConv)):
            kernel = params.get(bl.BINARY_KERNEL, params.get("kernel"))
            common = dict(
                use_bias=layer.use_bias,
                input_quantizer=layer.input_quantizer,
                kernel_quantizer=layer.kernel_quantizer,
                binary_kernel=layer.binary_kernel,
                scale=layer.scale,
                rngs=rngs,
            )
            if isinstance(layer, bl.BinaryDense):
                twin = bnn.BinaryLinear(kernel.shape[0], layer.features, **common)
            else:
                twin = bnn.BinaryConv(
                    kernel.shape[-2] * layer.feature_group_count,
                    layer.features,
                    kernel.shape[:-2],
                    strides=layer.strides,
                    padding=layer.padding,
                    kernel_dilation=layer.kernel_dilation,
                    feature_group_count=layer.feature_group_count,
                    pad_value=layer.pad_value,
                    **common,
                )
            put(twin.kernel, kernel)
            if layer.scale == "learned":
                put(twin.scale, params["scale"])
            elif layer.scale == "fixed":
                put(twin.scale, v[bl.CONSTANTS]["scale"])
        elif isinstance(layer, nn.BatchNorm):
            stats = v["batch_stats"]
            twin = nnx.BatchNorm(
                stats["mean"].shape[-1],
                use_scale=layer.use_scale,
                use_bias=layer.use_bias,
                epsilon=layer.epsilon,
                rngs=rngs,
            )
            put(twin.mean, stats["mean"])
            put(twin.var, stats["var"])
            if layer.use_scale:
                put(twin.scale, params["scale"])
        elif isinstance(layer, nn.Dense):
            kernel = params["kernel"]
            twin = nnx.Linear(*kernel.shape, use_bias=layer.use_bias, rngs=rngs)
            put(twin.kernel, kernel)
        elif isinstance(layer, nn.Conv):
            kernel = params["kernel"]
            twin = nnx.Conv(
                kernel.shape[-2] * layer.feature_group_count,
                kernel.shape[-1],
                kernel.shape[:-2],
                strides=layer.strides,
                padding=layer.padding,
                kernel_dilation=layer.kernel_dilation,
                feature_group_count=layer.feature_group_count,
                use_bias=layer.use_bias,
                rngs=rngs,
            )
            put(twin.kernel, kernel)
        else:
            raise ValueError(
                f"from_linen: layer {i} ({type(layer).__name__}) has no NNX twin here "
                "(BinaryDense, BinaryConv, Dense, Conv, BatchNorm, max_pool partials)"
            )
        if getattr(twin, "bias", None) is not None and "bias" in params:
            put(twin.bias, params["bias"])
        layers.append(twin)
    model = nnx.Sequential(*layers)
    model.eval()
    return model
