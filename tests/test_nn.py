"""Flax NNX binary layers: values, padding, gradients, labels, configuration errors."""

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from binax import nn as bnn
from binax import quantizers as q
from binax.nn import _native


def sign0(x):
    return np.where(np.asarray(x) >= 0, 1.0, -1.0)


def same_pads(size, k, s, d):
    """TensorFlow/lax 'SAME' padding for one axis, written out independently."""
    out = math.ceil(size / s)
    total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


def np_conv(xp, k, strides, dilation):
    """Naive channels-last N-d cross-correlation of an already padded input."""
    nsp = k.ndim - 2
    out_sp = [
        (xp.shape[1 + i] - ((k.shape[i] - 1) * dilation[i] + 1)) // strides[i] + 1
        for i in range(nsp)
    ]
    out = np.zeros((xp.shape[0], *out_sp, k.shape[-1]))
    for idx in np.ndindex(*out_sp):
        for kidx in np.ndindex(*k.shape[:nsp]):
            pos = tuple(idx[i] * strides[i] + kidx[i] * dilation[i] for i in range(nsp))
            patch = xp[(slice(None), *pos, slice(None))]  # (N, Cin)
            out[(slice(None), *idx, slice(None))] += patch @ k[kidx]
    return out


def rngs(seed=0):
    """RBG keys: random signs without compiling threefry for every kernel shape (fast tests)."""
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


#: binax's CPU kernel-gradient kernel, where this machine can build it (it needs a C++ compiler;
#: where one is found, a failed build fails `test_direct_kernel_gradient_is_built_and_taken`).
HAS_DIRECT = jax.default_backend() == "cpu" and _native.available()
DIRECT = [("direct", None)] if HAS_DIRECT else []
needs_direct = pytest.mark.skipif(not HAS_DIRECT, reason="binax's CPU kernel is not available")


def rand(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_binary_kernel_init_is_exactly_plus_minus_one():
    layer = bnn.BinaryConv(3, 16, (3, 3), rngs=rngs())
    k = np.asarray(layer.kernel[...])
    assert type(layer.kernel) is bnn.BinaryParam and isinstance(layer.kernel, nnx.Param)
    assert k.shape == (3, 3, 3, 16) and k.dtype == np.float32
    assert set(np.unique(k)) == {-1.0, 1.0}
    assert 0.3 < np.mean(k > 0) < 0.7
    other = bnn.BinaryConv(3, 16, (3, 3), rngs=rngs(1))
    assert not np.array_equal(k, other.kernel[...])
    dense = bnn.BinaryLinear(5, 7, param_dtype=jnp.bfloat16, rngs=rngs())
    assert dense.kernel[...].dtype == jnp.bfloat16
    assert set(np.unique(np.asarray(dense.kernel[...], np.float32))) == {-1.0, 1.0}


def test_real_kernel_layer_and_variable_types():
    layer = bnn.BinaryLinear(
        8, 4, binary_kernel=False, kernel_quantizer=None, scale="learned", rngs=rngs()
    )
    assert type(layer.kernel) is nnx.Param
    assert len(np.unique(np.asarray(layer.kernel[...]))) > 2  # LeCun normal, not signs
    assert type(layer.bias) is nnx.Param and type(layer.scale) is nnx.Param
    fixed = bnn.BinaryLinear(8, 4, scale="fixed", use_bias=False, rngs=rngs())
    assert type(fixed.scale) is bnn.FixedScale and not isinstance(fixed.scale, nnx.Param)
    assert fixed.bias is None
    assert "scale" not in nnx.state(fixed, nnx.Param)


def test_binary_linear_matches_reference():
    layer = bnn.BinaryLinear(6, 4, scale="learned", rngs=rngs())
    layer.scale[...] = jnp.array([0.5, 1.0, 2.0, -1.0])
    layer.bias[...] = jnp.array([0.1, 0.2, 0.3, 0.4])
    x = rand((2, 3, 6))
    y = layer(x)
    want = sign0(x) @ np.asarray(layer.kernel[...]) * np.asarray(layer.scale[...]) + np.asarray(
        layer.bias[...]
    )
    assert y.shape == (2, 3, 4)
    np.testing.assert_allclose(y, want, rtol=1e-6)
    # Real input, latent real kernel quantized by ste_sign.
    layer = bnn.BinaryLinear(6, 4, input_quantizer=None, use_bias=False, rngs=rngs())
    layer.kernel[...] = rand((6, 4), seed=1) * 0.3
    np.testing.assert_allclose(
        layer(x), np.asarray(x) @ sign0(layer.kernel[...]), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "kernel_size,strides,dilation,padding,pad_value",
    [
        ((3, 3), 1, 1, "SAME", 1.0),
        ((3, 3), 1, 1, "SAME", -1.0),
        ((3, 2), 2, 1, "SAME", -1.0),
        ((3, 3), 1, 2, "SAME", 1.0),
        ((3, 3), 2, 1, "VALID", 1.0),
        ((2, 2), 1, 1, ((1, 0), (0, 2)), -1.0),
        ((3,), 1, 1, "SAME", -1.0),
        ((4,), 3, 1, "SAME", 1.0),
        ((3,), 1, 1, 2, 1.0),
    ],
)
def test_binary_conv_matches_reference(kernel_size, strides, dilation, padding, pad_value):
    n = len(kernel_size)
    spatial = (7, 6)[:n]
    layer = bnn.BinaryConv(
        3,
        5,
        kernel_size,
        strides=strides,
        kernel_dilation=dilation,
        padding=padding,
        pad_value=pad_value,
        use_bias=False,
        rngs=rngs(),
    )
    x = rand((2, *spatial, 3))
    y = np.asarray(nnx.jit(lambda m, x: m(x))(layer, x))
    s, d = (strides,) * n, (dilation,) * n
    if padding == "SAME":
        pads = [same_pads(spatial[i], kernel_size[i], s[i], d[i]) for i in range(n)]
    elif padding == "VALID":
        pads = [(0, 0)] * n
    elif isinstance(padding, int):
        pads = [(padding, padding)] * n
    else:
        pads = list(padding)
    xp = np.pad(sign0(x), [(0, 0), *pads, (0, 0)], constant_values=pad_value)
    want = np_conv(xp, np.asarray(layer.kernel[...]), s, d)
    assert y.shape == want.shape
    np.testing.assert_allclose(y, want, rtol=1e-6)
    np.testing.assert_allclose(layer(x[1]), want[1], rtol=1e-6)  # unbatched: the same padding
    # A binary input with a binary kernel gives integer outputs of the right parity.
    assert np.all(y == np.round(y))


def test_pad_value_reaches_the_borders():
    ones = dict(kernel_init=lambda key, shape, dtype: jnp.ones(shape, dtype), use_bias=False)
    x = jnp.ones((1, 4, 4, 2))
    plus = bnn.BinaryConv(2, 1, (3, 3), pad_value=1.0, rngs=rngs(), **ones)(x)
    minus = bnn.BinaryConv(2, 1, (3, 3), pad_value=-1.0, rngs=rngs(), **ones)(x)
    np.testing.assert_array_equal(plus, 18.0)  # every tap sees +1
    assert minus[0, 0, 0, 0] == 18 - 2 * 2 * 5  # a corner sees 5 padded taps of -1 per channel
    assert minus[0, 1, 1, 0] == 18.0  # interior unchanged
    # Zero padding is only for real inputs.
    real = bnn.BinaryConv(2, 1, (3, 3), input_quantizer=None, pad_value=None, rngs=rngs(), **ones)(
        x
    )
    assert real[0, 0, 0, 0] == 8.0


def test_conv_batch_axes_grouped_and_unbatched():
    layer = bnn.BinaryConv(4, 6, (3, 3), feature_group_count=2, strides=(1, 2), rngs=rngs())
    assert layer.kernel[...].shape == (3, 3, 2, 6)
    x = rand((2, 3, 5, 8, 4))
    y = layer(x)
    assert y.shape == (2, 3, 5, 4, 6)
    np.testing.assert_allclose(y[1, 2], layer(x[1, 2]), rtol=1e-6)
    conv3d = bnn.BinaryConv(2, 3, (2, 2, 2), rngs=rngs())
    assert conv3d(rand((1, 4, 4, 4, 2))).shape == (1, 4, 4, 4, 3)


def test_scales_and_custom_quantizers():
    layer = bnn.BinaryConv(2, 3, (3, 3), scale="fixed", use_bias=False, rngs=rngs())
    x = rand((1, 5, 5, 2))
    base = layer(x)
    layer.scale[...] = jnp.array([2.0, -1.0, 0.5])
    np.testing.assert_allclose(layer(x), base * jnp.array([2.0, -1.0, 0.5]), rtol=1e-6)
    mag = bnn.BinaryLinear(
        4, 3, kernel_quantizer="magnitude_aware_sign", use_bias=False, rngs=rngs()
    )
    mag.kernel[...] = rand((4, 3), seed=2)
    k = np.asarray(mag.kernel[...])
    xs = rand((2, 4), seed=3)
    want = sign0(xs) @ (sign0(k) * np.mean(np.abs(k), axis=0))
    np.testing.assert_allclose(mag(xs), want, rtol=1e-5)
    custom = bnn.BinaryLinear(
        4, 3, input_quantizer=functools.partial(q.ste_sign, clip_value=2.0), rngs=rngs()
    )
    assert custom.input_quantizer.keywords == {"clip_value": 2.0}
    assert custom.input_precision == 1


def test_gradients_reach_binary_kernels_and_inputs():
    model = nnx.Sequential(
        bnn.BinaryConv(
            2, 4, (3, 3), input_quantizer=None, pad_value=None, use_bias=False, rngs=rngs()
        ),
        bnn.BinaryConv(4, 4, (3, 3), use_bias=False, rngs=rngs(1)),
        lambda x: x.reshape((x.shape[0], -1)),
        bnn.BinaryLinear(4 * 5 * 5, 3, scale="learned", rngs=rngs(2)),
    )
    x = rand((3, 5, 5, 2)) * 0.1

    def loss(m, x):
        return jnp.mean((m(x) - 1.0) ** 2)

    grad = nnx.jit(nnx.grad(loss))
    grads = grad(model, x)
    for i in (0, 1, 3):
        g = np.asarray(grads.layers[i]["kernel"][...])
        assert np.count_nonzero(g) > g.size // 2, i
    gx = nnx.jit(nnx.grad(loss, argnums=1))(model, x)
    assert np.count_nonzero(gx) > 0
    # STE: kernels of +-1 sit on the clip boundary and still pass the gradient; a latent
    # weight beyond the clip gets none.
    model.layers[3].kernel[...] = model.layers[3].kernel[...].at[0, 0].set(1.5)
    g = grad(model, x).layers[3]["kernel"][...]
    assert g[0, 0] == 0 and np.count_nonzero(g[1:]) > 0


class Small(nnx.Module):
    def __init__(self, rngs):
        self.conv = bnn.BinaryConv(
            1, 4, (3, 3), input_quantizer=None, pad_value=None, use_bias=False, rngs=rngs
        )
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.blocks = nnx.List(
            [
                bnn.BinaryConv(4, 4, (3, 3), scale="fixed", rngs=rngs),
                nnx.Conv(4, 4, (1, 1), rngs=rngs),
            ]
        )
        self.head = bnn.BinaryLinear(
            4, 3, binary_kernel=False, kernel_quantizer=None, scale="learned", rngs=rngs
        )

    def __call__(self, x):
        x = self.bn(self.conv(x))
        for b in self.blocks:
            x = b(x)
        return self.head(x.mean(axis=(1, 2)))


def test_binary_labels_structure_matches_optimizer_trees():
    model = Small(rngs())
    labels = bnn.binary_labels(model)
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    assert jax.tree.structure(labels) == jax.tree.structure(params)
    grads = nnx.jit(nnx.grad(lambda m, x: jnp.sum(m(x))))(model, rand((2, 6, 6, 1)))
    assert jax.tree.structure(labels) == jax.tree.structure(
        nnx.as_pure(nnx.state(grads, nnx.Param))
    )
    flat = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(labels)}
    assert {k for k, v in flat.items() if v} == {"conv/kernel", "blocks/0/kernel"}
    assert all(isinstance(v, bool) for v in flat.values())
    # From a state, with a narrower filter, idempotent.
    assert bnn.binary_labels(nnx.state(model)) == labels
    only = bnn.binary_labels(model, bnn.BinaryParam)
    assert all(jax.tree.leaves(only)) and len(jax.tree.leaves(only)) == 2
    assert bnn.binary_labels(labels) is labels
    # optax.partition with these labels trains binary and real leaves separately.
    tx = optax.partition({True: optax.set_to_zero(), False: optax.sgd(1.0)}, labels)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    before = nnx.clone(model)
    nnx.jit(lambda opt, model, grads: opt.update(model, grads))(opt, model, grads)
    assert np.array_equal(model.conv.kernel[...], before.conv.kernel[...])
    assert not np.array_equal(model.head.kernel[...], before.head.kernel[...])


def test_binary_labels_errors():
    model = Small(rngs())
    with pytest.raises(ValueError, match="model_or_state"):
        bnn.binary_labels({"kernel": jnp.ones(2)})
    with pytest.raises(ValueError, match="as_pure"):
        bnn.binary_labels(nnx.as_pure(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(pad_value=0.0), "pad_value"),
        (dict(pad_value=0.5), "pad_value"),
        (dict(pad_value=True), "pad_value"),
        (dict(pad_value=None), "pad_value"),
        (dict(binary_kernel=False), "kernel_quantizer"),
        (dict(binary_kernel=False, kernel_quantizer="approx_sign"), "kernel_quantizer"),
        (dict(binary_kernel="yes"), "binary_kernel"),
        (dict(input_quantizer="sign"), "input_quantizer"),
        (dict(kernel_quantizer="stesign"), "kernel_quantizer"),
        (dict(scale="xnor"), "scale"),
        (dict(padding="CIRCULAR"), "padding"),
        (dict(padding=((1, 1),)), "padding"),
        (dict(strides=(1, 2, 3)), "strides"),
        (dict(kernel_dilation=(1,)), "kernel_dilation"),
        (dict(feature_group_count=3), "feature_group_count"),
        (dict(kernel_size=(3, 0)), "kernel_size"),
    ],
)
def test_conv_configuration_errors(kwargs, match):
    args = dict(kernel_size=(3, 3))
    args.update(kwargs)
    ks = args.pop("kernel_size")
    with pytest.raises(ValueError, match=match):
        bnn.BinaryConv(4, 4, ks, rngs=rngs(), **args)


def test_linear_configuration_errors():
    with pytest.raises(ValueError, match="kernel_quantizer"):
        bnn.BinaryLinear(3, 2, binary_kernel=False, rngs=rngs())
    with pytest.raises(ValueError, match="scale"):
        bnn.BinaryLinear(3, 2, scale=True, rngs=rngs())
    # Valid: a latent-free binary kernel without a quantizer, a real input.
    layer = bnn.BinaryLinear(3, 2, kernel_quantizer=None, input_quantizer=None, rngs=rngs())
    assert layer.input_precision == 32


def test_layers_jit_and_bfloat16():
    layer = bnn.BinaryConv(3, 4, (3, 3), param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, rngs=rngs())
    x = rand((2, 5, 5, 3)).astype(jnp.bfloat16)
    y = nnx.jit(lambda m, x: m(x))(layer, x)
    assert y.dtype == jnp.bfloat16 and y.shape == (2, 5, 5, 4)
    ref = bnn.BinaryConv(3, 4, (3, 3), rngs=rngs())
    np.testing.assert_array_equal(np.asarray(y, np.float32), ref(x.astype(jnp.float32)))


# --- how the products are computed: exactness of the fast paths -------------------------------

F = bnn.functional


def reference_conv(x, k, pads, pad_value, strides=1, dilation=1, groups=1, quantize=True):
    """The plain formula: quantize, jnp.pad with pad_value, VALID convolution, autodiff."""
    a = q.ste_sign(x) if quantize else x
    w = q.ste_sign(k)
    a = jnp.pad(a, [(0, 0), *pads, (0, 0)], constant_values=pad_value)
    n = k.ndim - 2
    return jax.lax.conv_general_dilated(
        a,
        w,
        (strides,) * n,
        "VALID",
        rhs_dilation=(dilation,) * n,
        dimension_numbers=F._dimension_numbers(a.ndim),
        feature_group_count=groups,
    )


def kernel_grad_bound(g, k_shape, padded_shape, strides, dilation):
    """Worst-case float32 rounding bound of each kernel-gradient entry, a sum of m = N*H*W
    products of a +-1 input with g: m * eps * sum |g| over the entry's terms (Higham, "Accuracy
    and Stability of Numerical Algorithms", 2002, eq. 3.5), for either summation order."""
    n = len(k_shape) - 2
    ones = jnp.ones(padded_shape)
    _, vjp = jax.vjp(
        lambda w: jax.lax.conv_general_dilated(
            ones,
            w,
            (strides,) * n,
            "VALID",
            rhs_dilation=(dilation,) * n,
            dimension_numbers=F._dimension_numbers(ones.ndim),
        ),
        jnp.zeros(k_shape),
    )
    m = np.prod(g.shape[:-1])
    return m * np.finfo(np.float32).eps * np.asarray(vjp(jnp.abs(g))[0])


@pytest.mark.parametrize(
    "kernel_size,strides,dilation,groups",
    [((3, 3), 1, 1, 1), ((3, 3), 2, 1, 1), ((3, 3), 1, 2, 1), ((3,), 1, 1, 1), ((3, 3), 1, 1, 2)],
)
@pytest.mark.parametrize("pad_value", [1.0, -1.0])
def test_integer_forward_and_gradients_are_bit_identical(
    kernel_size, strides, dilation, groups, pad_value, monkeypatch
):
    """int8 products (int32 accumulation), the folded +-1 border and the custom JVP give exactly
    the values and gradients of the plain float formula; the patch-product kernel gradient
    differs from XLA's only by float summation order, within the worst-case rounding bound,
    whether the batch is one chunk of patches or cut into one chunk per example, and so does
    binax's CPU kernel (``'direct'``, where it can be built)."""
    n = len(kernel_size)
    x = rand((6, *(9,) * n, 4))
    k = rand((*kernel_size, 4 // groups, 6), 1)
    pads = F.conv_padding("SAME", x.shape[1:-1], kernel_size, (strides,) * n, (dilation,) * n)
    ref = functools.partial(
        reference_conv,
        pads=pads,
        pad_value=pad_value,
        strides=strides,
        dilation=dilation,
        groups=groups,
    )
    y_ref, vjp_ref = jax.vjp(ref, x, k)
    g = rand(y_ref.shape, 2)
    dx_ref, dk_ref = vjp_ref(g)
    default_budget = F.PATCH_CHUNK_ROWS
    for arithmetic in ("integer", "float"):
        # A budget of 1 row cuts the batch into one chunk of patches per example (6 chunks).
        for kernel_grad, budget in [("xla", None), ("patches", None), ("patches", 1)] + DIRECT:
            monkeypatch.setattr(F, "PATCH_CHUNK_ROWS", budget or default_budget)
            f = functools.partial(
                F.binary_conv,
                strides=strides,
                kernel_dilation=dilation,
                feature_group_count=groups,
                pad_value=pad_value,
                arithmetic=arithmetic,
                kernel_grad=kernel_grad,
            )
            y, vjp = jax.jit(lambda x, k, f=f: jax.vjp(f, x, k))(x, k)
            dx, dk = vjp(g)
            text = jax.jit(vjp).lower(g).as_text()
            assert ("while" in text) == (budget == 1 and groups == 1), (kernel_grad, budget)
            direct = kernel_grad == "direct" and groups == 1
            assert (_native.KERNEL_GRAD in text) == direct, kernel_grad
            np.testing.assert_array_equal(y, y_ref)
            np.testing.assert_array_equal(dx, dx_ref)
            if kernel_grad == "xla" or groups > 1:  # grouped convolutions always use XLA's
                np.testing.assert_array_equal(dk, dk_ref)
            else:
                err = np.abs(np.asarray(dk) - np.asarray(dk_ref))
                padded = (
                    x.shape[0],
                    *(s + lo + hi for s, (lo, hi) in zip(x.shape[1:-1], pads, strict=True)),
                    4,
                )
                bound = kernel_grad_bound(g, k.shape, padded, strides, dilation)
                assert np.all(err <= bound), (arithmetic, kernel_grad, float(err.max()))
                # Patch products sum in another order than XLA's convolution (direct may not).
                assert (direct or 0 < err.max()) and err.max() < 1e-3 * np.abs(dk_ref).max()


@pytest.mark.parametrize(
    "spatial,strides,padding,pad_value",
    [((1, 1), 1, "SAME", 1.0), ((2, 2), 1, "SAME", -1.0), ((2, 3), 2, "SAME", 1.0),
     ((4, 4), 2, "SAME", -1.0), ((3, 3), 1, "VALID", 1.0), ((2,), 1, "SAME", -1.0)],
)  # fmt: skip
def test_small_convolutions_are_patch_products_with_exact_values(
    spatial, strides, padding, pad_value
):
    """Where the input or output is at most `SMALL_CONV_WIDTH` wide, the convolution and its
    input gradient are matrix products of patches (no XLA convolution left in the forward or
    the backward pass): values exactly those of the plain formula, integer and float paths
    identical, and gradients within the float rounding bound of the formula's."""
    n = len(spatial)
    kernel_size = (3,) * n
    x = rand((4, *spatial, 6))
    k = rand((*kernel_size, 6, 5), 1)
    s = (strides,) * n
    pads = F.conv_padding(padding, spatial, kernel_size, s, (1,) * n)
    y_ref, vjp_ref = jax.vjp(
        functools.partial(reference_conv, pads=pads, pad_value=pad_value, strides=strides), x, k
    )
    g = rand(y_ref.shape, 2)
    dx_ref, dk_ref = vjp_ref(g)
    # Each gradient entry sums at most `terms` products of a +-1 with an entry of g.
    terms = math.prod(g.shape[:-1]) * math.prod(kernel_size) * 6
    bx, bk = (terms * np.finfo(np.float32).eps * np.asarray(b) for b in vjp_ref(jnp.abs(g)))
    results = []
    for arithmetic in ("integer", "float"):
        f = functools.partial(
            F.binary_conv, strides=strides, padding=padding, pad_value=pad_value,
            arithmetic=arithmetic,
        )  # fmt: skip
        train = jax.jit(lambda x, k, f=f: jax.vjp(f, x, k)[1](g))
        assert "convolution" not in train.lower(x, k).as_text()
        assert "convolution" not in jax.jit(f).lower(x, k).as_text()
        y = f(x, k)
        dx, dk = train(x, k)
        np.testing.assert_array_equal(y, y_ref)
        assert np.all(np.abs(np.asarray(dx) - np.asarray(dx_ref)) <= np.abs(bx))
        assert np.all(np.abs(np.asarray(dk) - np.asarray(dk_ref)) <= np.abs(bk))
        results.append((dx, dk))
    for a, b in zip(*results, strict=True):
        np.testing.assert_array_equal(a, b)
    # A wider convolution, or one 2 wide in only some axes, is still XLA's (float; integer
    # products of signs take binax's CPU kernel, see test_binary_popcount_convolution_is_exact).
    conv = functools.partial(F.binary_conv, pad_value=pad_value, arithmetic="float")
    for shape in ((3,) * n, (2, 7)[:n] if n == 2 else (3,)):
        assert "convolution" in jax.jit(conv).lower(rand((4, *shape, 6)), k).as_text()


@pytest.mark.parametrize(
    "spatial,padding,dilation,pad_value,larger",
    [((9, 7), "SAME", 1, 1.0, True), ((9, 7), "SAME", 2, -1.0, True),
     ((9, 7), [(2, 2), (1, 1)], 1, -1.0, False), ((9, 7), "VALID", 1, 1.0, False),
     ((11,), "SAME", 1, -1.0, False)],
)  # fmt: skip
def test_input_gradient_is_a_one_row_larger_convolution(
    spatial, padding, dilation, pad_value, larger
):
    """On the CPU the input gradient of a 2-d stride-1 convolution whose output is as large as
    its input is computed as a convolution one row larger than its input (which XLA:CPU gives
    to Eigen, not YNNPACK: `_input_tangent`); other convolutions are left to lax. Values are
    the plain formula's, gradients and forward-mode tangents within the float rounding bound
    of its."""
    n = len(spatial)
    x = rand((4, *spatial, 20))  # more than 16 channels: a convolution YNNPACK would take
    k = rand((*(3,) * n, 20, 24), 1)
    pads = F.conv_padding(padding, spatial, (3,) * n, (1,) * n, (dilation,) * n)
    ref = functools.partial(reference_conv, pads=pads, pad_value=pad_value, dilation=dilation)
    y_ref, vjp_ref = jax.vjp(ref, x, k)
    g = rand(y_ref.shape, 2)
    dx_ref, dk_ref = vjp_ref(g)
    # Each input-gradient entry sums at most 3**n * 24 products of a +-1 with an entry of g.
    _, vjp_ones = jax.vjp(ref, x, jnp.ones_like(k))  # sum |g| over each entry's terms
    bound = 3**n * 24 * np.finfo(np.float32).eps * np.asarray(vjp_ones(jnp.abs(g))[0])
    padded = (4, *(s + lo + hi for s, (lo, hi) in zip(spatial, pads, strict=True)), 20)
    k_bound = kernel_grad_bound(g, k.shape, padded, 1, dilation)
    tangents = (rand(x.shape, 3), rand(k.shape, 4))
    t_ref = jax.jvp(ref, (x, k), tangents)[1]
    for arithmetic in ("integer", "float"):
        f = functools.partial(
            F.binary_conv, padding=padding, kernel_dilation=dilation, pad_value=pad_value,
            arithmetic=arithmetic,
        )  # fmt: skip
        backward = jax.jit(lambda x, k, f=f: jax.vjp(f, x, k)[1](g))
        text = backward.lower(x, k).as_text()
        extended = "x".join(str(d) for d in (4, spatial[0] + 1, *spatial[1:], 20))
        assert (f"tensor<{extended}xf32>" in text) == (larger and jax.default_backend() == "cpu")
        np.testing.assert_array_equal(f(x, k), y_ref)
        dx, dk = backward(x, k)
        assert np.all(np.abs(np.asarray(dx) - np.asarray(dx_ref)) <= bound), arithmetic
        assert np.all(np.abs(np.asarray(dk) - np.asarray(dk_ref)) <= k_bound), arithmetic
        t = jax.jit(lambda x, k, f=f: jax.jvp(f, (x, k), tangents)[1])(x, k)
        np.testing.assert_allclose(t, t_ref, rtol=1e-5, atol=1e-4)
    # Strided convolutions are left as they are (their transpose dilates the input already).
    f = functools.partial(F.binary_conv, strides=2, pad_value=pad_value)
    text = jax.jit(lambda x, k: jax.grad(lambda x: f(x, k).sum())(x)).lower(x, k).as_text()
    assert f"tensor<4x{spatial[0] + 1}x" not in text


def test_empty_outputs_and_numpy_integer_arguments():
    """A window larger than the (padded) input gives an empty output, as lax does; NumPy
    integers are accepted wherever ints are."""
    y = F.binary_conv(rand((1, 2, 3)), rand((5, 3, 4)), padding="VALID")
    assert y.shape == (1, 0, 4)
    assert F.max_pool(rand((1, 1, 1, 1)), 3, strides=1).shape == (1, 0, 0, 1)
    assert F.max_pool(rand((1, 1, 1)), 2, strides=3).shape == (1, 0, 1)
    x, k = rand((2, 5, 5, 3)), rand((3, 3, 3, 4), 1)
    want = F.binary_conv(x, k, strides=(2, 1), kernel_dilation=2)
    got = F.binary_conv(x, k, strides=(np.int64(2), 1), kernel_dilation=np.int32(2))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "kernel,strides,shape,padding,dilation",
    [
        ((7, 7), 2, (3, 12, 12, 3), "SAME", 1),  # ResNet's ImageNet stem
        ((1, 1), 1, (3, 2, 2, 8), "SAME", 1),  # a shortcut at 2x2: a patch product
        ((3, 3), 2, (2, 9, 9, 4), "VALID", 2),
        ((3, 3), 1, (2, 9, 9, 4), "CIRCULAR", 1),  # Flax pads first, then VALID
        ((3,), 1, (2, 9, 4), ((2, 0),), 1),
    ],
)
def test_conv_general_dilated_drop_in_for_flax_conv(kernel, strides, shape, padding, dilation):
    """As Flax's ``Conv(conv_general_dilated=...)``: lax's values and gradients (up to the float
    summation order), with the kernel gradient as binax's CPU kernel (or a patch product where
    it is not available), not a convolution."""
    kw = dict(strides=strides, padding=padding, kernel_dilation=dilation, rngs=rngs())
    ref = nnx.Conv(shape[-1], 5, kernel, **kw)
    conv = nnx.Conv(shape[-1], 5, kernel, conv_general_dilated=F.conv_general_dilated, **kw)
    conv.kernel[...] = ref.kernel[...]
    x = rand(shape)
    np.testing.assert_allclose(conv(x), ref(x), rtol=1e-5, atol=1e-5)

    def grads(m):
        return nnx.grad(lambda m, x: (m(x) ** 2).sum(), argnums=(0, 1))(m, x)

    (dm, dx), (dm_ref, dx_ref) = grads(conv), grads(ref)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dm.kernel[...], dm_ref.kernel[...], rtol=1e-4, atol=1e-4)
    layout, s = F._dimension_numbers(x.ndim), (strides,) * len(kernel)

    def loss(k):
        return (conv.conv_general_dilated(x, k, s, "VALID", dimension_numbers=layout) ** 2).sum()

    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(conv.kernel[...]))
    # At most the forward pass is a convolution; the kernel gradient is binax's kernel.
    assert jaxpr.count("conv_general_dilated") <= 1
    assert (F._direct_grad_p.name if HAS_DIRECT else "dot_general") in jaxpr


def test_conv_general_dilated_leaves_the_rest_to_lax():
    x, k = rand((2, 6, 6, 3)), rand((3, 3, 3, 4), 1)
    nhwc = dict(dimension_numbers=("NHWC", "HWIO", "NHWC"))
    cases = [
        (x, k, ((1, 1), (1, 1)), dict(lhs_dilation=(2, 2), **nhwc)),
        (x, k, "SAME", dict(preferred_element_type=jnp.float32, **nhwc)),
        (x.transpose(0, 3, 1, 2), k.transpose(3, 2, 0, 1), "SAME", {}),  # lax's default NCHW
        (x.astype(jnp.int8), k.astype(jnp.int8), "VALID", nhwc),
    ]
    with pytest.raises(TypeError):  # mixed dtypes: lax's error, not a silent promotion
        F.conv_general_dilated(x.astype(jnp.bfloat16), k, (1, 1), "SAME", **nhwc)
    for a, b, padding, kw in cases:
        np.testing.assert_array_equal(
            F.conv_general_dilated(a, b, (1, 1), padding, **kw),
            jax.lax.conv_general_dilated(a, b, (1, 1), padding, **kw),
        )


def test_chunks_under_explicit_sharding(monkeypatch):
    """With the batch split over devices by explicit sharding, `map_chunks` maps over chunks
    that keep the batch's sharding (`lax.map` refuses a sharded mapped axis): the same values,
    and the patch-product kernel gradient in chunks equals the unchunked one."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    x = jax.device_put(rand((32, 6, 6, 3)), NamedSharding(mesh, P("data")))
    k = rand((3, 3, 3, 4), 1)
    with jax.set_mesh(mesh):
        f = lambda c: 2 * c + c.sum((1, 2, 3), keepdims=True)  # noqa: E731
        ys = jax.jit(lambda x: F.map_chunks(f, x, 2))
        y = ys(x)
        assert y.sharding.spec[0] == "data"
        assert "while" in ys.lower(x).as_text()
        np.testing.assert_array_equal(y, 2 * x + x.sum((1, 2, 3), keepdims=True))

        def grad(how="patches"):  # a new function each time: traced anew
            f = functools.partial(F.binary_conv, kernel_grad=how)
            return jax.jit(lambda x, k: jax.grad(lambda k: (f(x, k) ** 2).sum())(k))

        whole = grad()(x, k)
        for how, _ in DIRECT:  # binax's CPU kernel on a sharded batch
            np.testing.assert_allclose(grad(how)(x, k), whole, rtol=1e-5, atol=1e-4)
        monkeypatch.setattr(F, "PATCH_CHUNK_ROWS", 36)  # one example per device a chunk
        chunked = grad()(x, k)
        assert "while" in grad().lower(x, k).as_text()
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-4)


def test_patch_chunk_size_is_the_largest_divisor_within_the_budget():
    assert F.patch_chunk_size(256, 10, budget=45) == 4
    assert F.patch_chunk_size(256, 10, budget=10_000) == 256
    assert F.patch_chunk_size(6, 10, budget=45) == 3
    assert F.patch_chunk_size(7, 10, budget=45) == 1  # a prime batch: one example at a time
    assert F.patch_chunk_size(8, 100, budget=1) == 1
    assert F.patch_chunk_size(0, 10, budget=45) == 1
    # An empty batch still differentiates (a zero kernel gradient).
    dk = jax.grad(lambda k: F.binary_conv(jnp.ones((0, 5, 5, 3)), k).sum())(rand((3, 3, 3, 4)))
    np.testing.assert_array_equal(dk, np.zeros((3, 3, 3, 4)))


def test_integer_path_is_taken_and_exact_for_dense():
    x, k = rand((5, 3, 40)), rand((40, 7), 1)
    g = rand((5, 3, 7), 2)

    def ref(x, k):
        return q.ste_sign(x) @ q.ste_sign(k)

    y_ref, vjp_ref = jax.vjp(ref, x, k)
    f = functools.partial(F.binary_dense, arithmetic="integer")
    y, vjp = jax.vjp(f, x, k)
    np.testing.assert_array_equal(y, y_ref)
    for a, b in zip(vjp(g), vjp_ref(g), strict=True):
        np.testing.assert_array_equal(a, b)
    # The integer path really multiplies int8 with int32 accumulation.
    hlo = jax.jit(f).lower(x, k).as_text()
    assert "xi8>" in hlo and "xi32>" in hlo
    hlo_float = jax.jit(functools.partial(F.binary_dense, arithmetic="float")).lower(x, k)
    assert "i8" not in hlo_float.as_text()
    hlo_conv = jax.jit(functools.partial(F.binary_conv, arithmetic="integer")).lower(
        rand((2, 5, 5, 3)), rand((3, 3, 3, 4))
    )
    # An int8 convolution, or binax's CPU kernel on int8 signs.
    product = _native.BINARY_CONV if HAS_DIRECT else "convolution"
    assert product in hlo_conv.as_text() and "xi8>" in hlo_conv.as_text()


def test_forward_mode_differentiation_of_the_fast_paths():
    """jvp works through the custom JVP (no custom_vjp), and agrees with the plain formula."""
    x, k = rand((3, 7, 7, 4)), rand((3, 3, 4, 5), 1)
    tx, tk = rand(x.shape, 3), rand(k.shape, 4)
    pads = [(1, 1), (1, 1)]
    y_ref, t_ref = jax.jvp(
        functools.partial(reference_conv, pads=pads, pad_value=1.0), (x, k), (tx, tk)
    )
    for kernel_grad in ("xla", "patches", *(k for k, _ in DIRECT)):
        f = functools.partial(F.binary_conv, arithmetic="integer", kernel_grad=kernel_grad)
        y, t = jax.jvp(f, (x, k), (tx, tk))
        np.testing.assert_array_equal(y, y_ref)
        np.testing.assert_allclose(t, t_ref, rtol=1e-5, atol=1e-4)
    hess = jax.jacfwd(jax.grad(lambda k: jnp.sum(F.binary_dense(x[:, 0], k[0, 0]) ** 2)))(k)
    assert hess.shape == k.shape * 2 and np.isfinite(hess).all()


def test_bfloat16_backward_is_close_and_forward_unchanged():
    x, k = rand((8, 9, 9, 16)), rand((3, 3, 16, 8), 1)
    g = rand((8, 9, 9, 8), 2)
    exact = jax.vjp(F.binary_conv, x, k)
    bf16 = jax.vjp(functools.partial(F.binary_conv, backward_dtype=jnp.bfloat16), x, k)
    np.testing.assert_array_equal(exact[0], bf16[0])
    for a, b in zip(exact[1](g), bf16[1](g), strict=True):
        assert a.dtype == b.dtype == jnp.float32
        assert not np.array_equal(a, b)  # really rounded to bfloat16
        np.testing.assert_allclose(b, a, rtol=0.05, atol=0.05 * float(jnp.max(jnp.abs(a))))
    d = jax.vjp(functools.partial(F.binary_dense, backward_dtype=jnp.bfloat16), x[:, 0, 0], k[0, 0])
    assert d[1](g[:, 0, 0])[1].dtype == jnp.float32


def test_integer_valued_and_arithmetic_errors():
    assert F.integer_valued("ste_sign") and F.integer_valued(q.approx_sign)
    assert F.integer_valued(functools.partial(q.ste_sign, clip_value=2.0))
    assert F.integer_valued("ste_heaviside")
    assert not F.integer_valued("magnitude_aware_sign") and not F.integer_valued(None)
    assert not F.integer_valued(jnp.tanh)
    # auto: integer on the CPU only when both operands are integer-valued (a
    # magnitude_aware_sign kernel: its sign, the scale applied to the product).
    assert F.resolve_arithmetic("auto", "ste_sign", "ste_sign")
    assert F.resolve_arithmetic("auto", "ste_sign", "magnitude_aware_sign")
    assert not F.resolve_arithmetic("auto", "magnitude_aware_sign", "ste_sign")
    assert not F.resolve_arithmetic("auto", None, "magnitude_aware_sign")
    assert not F.resolve_arithmetic("float", "ste_sign", "ste_sign")
    with pytest.raises(ValueError, match="arithmetic='integer' needs integer-valued"):
        bnn.BinaryConv(4, 4, (3, 3), input_quantizer=jnp.tanh, arithmetic="integer", rngs=rngs())
    with pytest.raises(ValueError, match="BinaryLinear: arithmetic must be one of"):
        bnn.BinaryLinear(4, 4, arithmetic="int8", rngs=rngs())
    with pytest.raises(ValueError, match="BinaryConv: kernel_grad must be one of"):
        bnn.BinaryConv(4, 4, (3, 3), kernel_grad="im2col", rngs=rngs())
    with pytest.raises(ValueError, match="backward_dtype"):
        bnn.BinaryConv(4, 4, (3, 3), backward_dtype=jnp.int8, rngs=rngs())
    with pytest.raises(ValueError, match="backward_dtype"):
        F.binary_dense(rand((2, 3)), rand((3, 2)), backward_dtype="int32")
    # magnitude_aware_sign kernels compute the formula on both paths.
    x = rand((2, 5, 5, 4))
    a = jnp.pad(
        jnp.asarray(sign0(x), jnp.float32), [(0, 0), (1, 1), (1, 1), (0, 0)], constant_values=1.0
    )
    for arithmetic in ("auto", "float"):
        layer = bnn.BinaryConv(
            4, 4, (3, 3), kernel_quantizer="magnitude_aware_sign", use_bias=False,
            arithmetic=arithmetic, rngs=rngs(),
        )  # fmt: skip
        layer.kernel[...] = rand((3, 3, 4, 4), 1)
        k = layer.kernel[...]
        y_ref = np_conv(
            np.asarray(a), np.asarray(sign0(k) * np.mean(np.abs(k), axis=(0, 1, 2))), (1, 1), (1, 1)
        )
        np.testing.assert_allclose(layer(x), y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer", ["dense", "conv"])
def test_magnitude_aware_kernels_multiply_in_integers(layer):
    """With a magnitude_aware_sign kernel the integer path multiplies the signs in int8 and
    scales the product per channel: the float path's values and gradients up to float
    rounding; an all-zero channel gives zeros and finite gradients."""
    if layer == "dense":
        f, x, k = F.binary_dense, rand((6, 40)), rand((40, 5), 1)
    else:
        f, x, k = F.binary_conv, rand((3, 6, 6, 4)), rand((3, 3, 4, 5), 1)
    k = k.at[..., 2].set(0.0)
    g = rand(jax.eval_shape(f, x, k).shape, 2)
    out = {}
    for arithmetic in ("integer", "float"):
        fn = functools.partial(f, kernel_quantizer=q.magnitude_aware_sign, arithmetic=arithmetic)
        y, vjp = jax.vjp(fn, x, k)
        out[arithmetic] = (y, *vjp(g))
        hlo = jax.jit(fn).lower(x, k).as_text()
        assert ("xi8>" in hlo) == (arithmetic == "integer")
    for a, b in zip(out["integer"], out["float"], strict=True):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out["integer"][0][..., 2], 0.0)


@pytest.mark.parametrize(
    "window,strides,padding",
    [
        ((2, 2), None, "VALID"),  # non-overlapping: a reshape and a max
        ((3, 3), (2, 2), "SAME"),  # ResNet's stem pooling: shifted copies
        ((3, 2), (1, 2), "VALID"),
        ((2, 2), (1, 1), ((1, 0), (0, 1))),
        ((3,), (2,), "SAME"),
    ],
)
def test_max_pool_matches_flax_values_and_gradients_with_ties(window, strides, padding):
    n = len(window)
    x = jnp.round(rand((4, 9, 11, 3)[: n + 1] + (3,)) * 1.5)  # integers: many ties in windows
    ref = functools.partial(
        nnx.max_pool, window_shape=window, strides=strides or window, padding=padding
    )
    y_ref, vjp_ref = jax.vjp(ref, x)
    pool = functools.partial(F.max_pool, window=window, strides=strides, padding=padding)
    y, vjp = jax.vjp(pool, x)
    np.testing.assert_array_equal(y, y_ref)
    g = rand(y.shape, 1)
    np.testing.assert_array_equal(vjp(g)[0], vjp_ref(g)[0])
    t = rand(x.shape, 2)
    # Forward mode: the transpose of the same choice (<jvp t, g> = <t, vjp g>). JAX's own JVP of
    # padded overlapping windows breaks ties differently from its VJP, so flax's JVP is the
    # reference only without ties.
    y_dot = jax.jvp(pool, (x,), (t,))[1]
    np.testing.assert_allclose(jnp.vdot(y_dot, g), jnp.vdot(t, vjp(g)[0]), rtol=1e-5)
    np.testing.assert_array_equal(jax.jvp(pool, (t,), (x,))[1], jax.jvp(ref, (t,), (x,))[1])
    # int8 (the deployed networks' hidden activations) pads with its lowest value.
    x8 = x.astype(jnp.int8)
    np.testing.assert_array_equal(pool(x8), y_ref.astype(jnp.int8))
    if strides is not None:  # overlapping windows: no select_and_scatter in the backward pass
        assert "select_and_scatter" not in jax.jit(vjp).lower(g).as_text()


def test_max_pool_errors():
    x = rand((2, 6, 6, 3))
    with pytest.raises(ValueError, match="window"):
        F.max_pool(x, (2, 2, 2))
    with pytest.raises(ValueError, match="strides"):
        F.max_pool(x, 2, strides=0)
    with pytest.raises(ValueError, match="padding"):
        F.max_pool(x, 2, padding="CIRCULAR")


@needs_direct
@pytest.mark.parametrize(
    "shape,kernel_size,strides,dilation,padding,pad_value,arithmetic,out",
    [((5, 9, 9, 13), (3, 3), 1, 1, "SAME", 1.0, "integer", 37),
     ((3, 8, 11, 30), (3, 3), 2, 1, "SAME", -1.0, "integer", 37),
     ((2, 10, 7, 6), (3, 2), 1, 2, ((2, 0), (1, 3)), 1.0, "integer", 37),
     ((2, 6, 6, 5), (3, 3), 1, 1, "VALID", 1.0, "float", 37),
     ((3, 9, 8, 20), (3, 3), 2, 1, "SAME", 1.0, "float", 37),
     ((9, 4, 4, 13), (3, 3), 1, 1, "SAME", 1.0, "integer", 37),  # bands of several examples
     ((7, 5, 5, 6), (3, 3), 2, 1, "SAME", -1.0, "float", 37),
     ((2, 30, 30, 6), (3, 3), 1, 1, "SAME", 1.0, "integer", 32),  # bands of rows; g in place
     ((1, 9, 9, 5), (3, 3), 1, 1, "SAME", -1.0, "integer", 16),
     ((1, 3, 5, 40), (5, 5), (1, 2), 1, "SAME", 1.0, "integer", 37),
     ((4, 12, 7), (3,), 1, 1, "SAME", -1.0, "integer", 37),
     ((3, 15, 2), (5,), 2, 2, ((3, 1),), 1.0, "float", 37)],
)  # fmt: skip
def test_direct_kernel_gradient_matches_xla(
    shape, kernel_size, strides, dilation, padding, pad_value, arithmetic, out
):
    """binax's CPU kernel (``kernel_grad='direct'``) gives XLA's kernel gradient within the
    float rounding bound, for strides, dilations, uneven padding, 1-d convolutions, small images
    (whose bands hold several examples), a large one (several bands of rows, the last partial),
    channel counts that are not whole vectors (5, 6, 13, 30, 40; 37 outputs, copied padded)
    and outputs that are (16, 32: the gradient read in place), a batch that does not split
    evenly over threads, +-1 (int8) and real (float) inputs; under `jax.vmap` too."""
    n = len(kernel_size)
    x, k = rand(shape), rand((*kernel_size, shape[-1], out), 1)
    real = arithmetic == "float"  # a real input (no quantizer), zero padding
    f = functools.partial(
        F.binary_conv, strides=strides, kernel_dilation=dilation, padding=padding,
        pad_value=None if real else pad_value, arithmetic=arithmetic,
        input_quantizer=None if real else q.ste_sign,
    )  # fmt: skip
    y, vjp_ref = jax.vjp(lambda k: f(x, k, kernel_grad="xla"), k)
    g = rand(y.shape, 2)
    (dk_ref,) = vjp_ref(g)
    grad = jax.jit(lambda x, k, g: jax.vjp(lambda k: f(x, k, kernel_grad="direct"), k)[1](g)[0])
    assert _native.KERNEL_GRAD in grad.lower(x, k, g).as_text()
    pads = F.conv_padding(padding, shape[1:-1], kernel_size, F.ntuple(strides, n, "s"),
                          (dilation,) * n)  # fmt: skip
    padded = (shape[0], *(s + lo + hi for s, (lo, hi) in zip(shape[1:-1], pads, strict=True)), 1)
    # The bound for +-1 inputs, scaled by the largest |x| for a real input.
    scale = float(jnp.abs(x).max()) if real else 1.0
    if isinstance(strides, int):
        bound = scale * kernel_grad_bound(g, k.shape[:-2] + (1, out), padded, strides, dilation)
        assert np.all(np.abs(np.asarray(grad(x, k, g)) - np.asarray(dk_ref)) <= bound)
    else:  # (kernel_grad_bound takes one stride for all axes)
        np.testing.assert_allclose(grad(x, k, g), dk_ref, rtol=1e-5, atol=1e-4)
    per_example = jax.vmap(lambda x, g: grad(x[None], k, g[None]))(x, g)
    np.testing.assert_allclose(per_example.sum(0), dk_ref, rtol=1e-5, atol=1e-4)


@needs_direct
def test_direct_kernel_gradient_is_the_cpu_default_and_falls_back(monkeypatch):
    """``'auto'`` takes binax's CPU kernel on the CPU; without it (no compiler, a failed build,
    ``BINAX_NATIVE=0``) ``'auto'`` takes the patch product and ``'direct'`` is refused by name;
    grouped convolutions, a bfloat16 backward and one output position keep their paths."""
    assert F.resolve_kernel_grad("auto") == "direct"
    assert F.resolve_kernel_grad("direct", feature_group_count=2) == "xla"
    x, k = rand((2, 6, 6, 4)), rand((3, 3, 4, 5), 1)
    text = jax.jit(jax.grad(lambda k: F.binary_conv(x, k).sum())).lower(k).as_text()
    assert _native.KERNEL_GRAD in text
    bf16 = jax.grad(lambda k: F.binary_conv(x, k, backward_dtype=jnp.bfloat16).sum())
    assert _native.KERNEL_GRAD not in jax.jit(bf16).lower(k).as_text()
    # One output position per example: the patches' one matrix product (faster there).
    one = jax.grad(lambda k: F.binary_conv(x[:, :1, :1], k, kernel_grad="direct").sum())
    assert _native.KERNEL_GRAD not in jax.jit(one).lower(k).as_text()
    monkeypatch.setattr(_native, "available", lambda: False)
    assert F.resolve_kernel_grad("auto") == "patches"
    with pytest.raises(ValueError, match="kernel_grad='direct' needs"):
        F.resolve_kernel_grad("direct")


def test_native_build_failure_warns_and_falls_back(monkeypatch, tmp_path):
    """A compiler that fails: one warning that says why, no kernel; ``BINAX_NATIVE=0``: none,
    silently."""
    build = _native.available.__wrapped__
    monkeypatch.setenv("BINAX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    with pytest.warns(RuntimeWarning, match="CPU kernels are not available.*failed"):
        assert build() is False
    assert not list(tmp_path.glob("*.so"))
    monkeypatch.setenv("BINAX_NATIVE", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build() is False


@needs_direct
@pytest.mark.parametrize(
    "shape,kernel_size,strides,dilation,padding,pad_value,out",
    [((3, 9, 9, 5), (3, 3), 1, 1, "SAME", 1.0, 7),
     ((2, 8, 11, 33), (3, 3), (2, 1), (1, 2), ((2, 0), (1, 3)), -1.0, 70),
     ((2, 6, 6, 64), (3, 3), 1, 1, "VALID", 1.0, 40),
     ((2, 3, 3, 40), (3, 3), 2, 1, "SAME", -1.0, 16),  # small: not the patch product
     ((4, 12, 70), (5,), 2, 1, "SAME", -1.0, 33)],
)  # fmt: skip
def test_binary_popcount_convolution_is_exact(
    shape, kernel_size, strides, dilation, padding, pad_value, out
):
    """On the CPU a convolution of signs (``ste_sign`` input, sign, heaviside or
    magnitude-aware kernel, padding +-1) is binax's bit kernel: exactly the plain formula's
    values (C not a whole number of 32-bit words, outputs not whole vectors, strides, dilation,
    uneven padding, 1-d, kernels with zeros), the int8 product's; other inputs, and
    ``BINARY_POPCOUNT = False``, keep XLA's int8 convolution."""
    n = len(kernel_size)
    x, k = rand(shape), rand((*kernel_size, shape[-1], out), 1)
    pads = F.conv_padding(padding, shape[1:-1], kernel_size, F.ntuple(strides, n, "s"),
                          F.ntuple(dilation, n, "d"))  # fmt: skip
    kw = dict(strides=strides, kernel_dilation=dilation, padding=padding, pad_value=pad_value)
    k_zero = k.at[..., 3].set(0.0)  # a magnitude-aware kernel's all-zero channel: sign 0
    for kernel_quantizer, kernel in [
        (q.ste_sign, k), (q.ste_heaviside, k), (q.magnitude_aware_sign, k_zero)
    ]:  # fmt: skip
        quantized = np.asarray(kernel_quantizer(kernel))
        ref = np_conv(np.pad(sign0(x), [(0, 0), *pads, (0, 0)], constant_values=pad_value),
                      quantized, F.ntuple(strides, n, "s"), F.ntuple(dilation, n, "d"))  # fmt: skip
        f = functools.partial(F.binary_conv, kernel_quantizer=kernel_quantizer, **kw)
        assert _native.BINARY_CONV in jax.jit(f).lower(x, kernel).as_text()
        np.testing.assert_allclose(f(x, kernel), ref, rtol=1e-6, atol=1e-4)
        if kernel_quantizer is not q.magnitude_aware_sign:  # an exact integer product
            np.testing.assert_array_equal(f(x, kernel), ref.astype(np.float32))
        popcount = f(x, kernel)
        with pytest.MonkeyPatch.context() as m:
            m.setattr(F, "BINARY_POPCOUNT", False)
            int8 = jax.jit(lambda x, k, f=f: f(x, k))  # traced anew
            assert _native.BINARY_CONV not in int8.lower(x, kernel).as_text()
            np.testing.assert_array_equal(popcount, int8(x, kernel))
    heaviside = functools.partial(F.binary_conv, input_quantizer=q.ste_heaviside, **kw)
    assert _native.BINARY_CONV not in jax.jit(heaviside).lower(x, k).as_text()


@needs_direct
def test_direct_kernel_gradient_differentiates_again():
    """Through binax's kernel gradient: Hessians, gradients of gradients (in the kernel and in
    the input), forward-mode over reverse-mode, and vmap either side of grad, all equal to
    XLA's kernel gradient's within float rounding (a real input: every path is smooth)."""
    x, k = rand((2, 5, 5, 3)), rand((3, 3, 3, 4), 1)

    def loss(how, x, k):
        y = F.binary_conv(x, k, kernel_grad=how, input_quantizer=None, kernel_quantizer=None,
                          pad_value=None)  # fmt: skip
        return (y**2).sum()

    def grad_k(how, x, k):
        return jax.grad(functools.partial(loss, how), argnums=1)(x, k)

    checks = {
        "hessian": lambda how: jax.hessian(lambda k: loss(how, x, k))(k),
        "grad_x of grad_k": lambda how: jax.grad(lambda x: (grad_k(how, x, k) ** 2).sum())(x),
        "jvp of grad_k": lambda how: jax.jvp(
            lambda k: grad_k(how, x, k), (k,), (jnp.ones_like(k),)
        )[1],
        "vmap of grad": lambda how: jax.vmap(lambda xi: grad_k(how, xi[None], k))(x),
        "grad of vmap": lambda how: jax.grad(
            lambda k: jax.vmap(lambda xi: loss(how, xi[None], k))(x).sum()
        )(k),
    }
    for name, check in checks.items():
        expected = check("xla")
        tol = 1e-5 * float(jnp.abs(expected).max())
        np.testing.assert_allclose(check("direct"), expected, rtol=1e-5, atol=tol, err_msg=name)


@needs_direct
def test_cpu_kernels_on_a_batch_split_by_automatic_sharding():
    """On a batch split over 4 (simulated) CPU devices by automatic sharding, the popcount
    forward and the kernel gradient give the single-device values (XLA gathers the batch to
    each device for them)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    x, k = rand((16, 6, 6, 8)), rand((3, 3, 8, 5), 1)
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))

    def forward_and_grad(x, k):
        return jax.value_and_grad(lambda k: (F.binary_conv(x, k) ** 2).sum())(k)

    f = jax.jit(forward_and_grad, out_shardings=NamedSharding(mesh, P()))
    text = f.lower(xs, k).as_text()
    assert _native.BINARY_CONV in text and _native.KERNEL_GRAD in text
    (y, dk), (y_ref, dk_ref) = f(xs, k), jax.jit(forward_and_grad)(x, k)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_allclose(dk, dk_ref, rtol=1e-6, atol=1e-4)
