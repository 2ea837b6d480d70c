"""Reference architectures: shapes, which kernels are binary, one training step per optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import binax
from binax import models
from binax import nn as bnn

# Tiny configurations (name, kwargs, input shape, expected binary kernel paths).
BINARYNET_CONVS = [f"convs/{i}/kernel" for i in range(6)]
BINARYNET_DENSE = [f"dense/{i}/kernel" for i in range(3)]
RESNET_BINARY = [f"blocks/{b}/conv{c}/kernel" for b in range(8) for c in (1, 2)]

CONFIGS = {
    "mlp": (
        "mlp",
        dict(input_shape=(28, 28, 1), hidden_sizes=(32, 16)),
        (4, 28, 28, 1),
        ["layers/0/kernel", "layers/1/kernel", "layers/2/kernel"],
    ),
    "mlp_real_first_last": (
        "mlp",
        dict(input_shape=(28, 28, 1), hidden_sizes=(32, 16), real_first=True, real_last=True),
        (4, 28, 28, 1),
        ["layers/1/kernel"],
    ),
    "binarynet": (
        "binarynet",
        dict(input_shape=(28, 28, 1), width_multiplier=1 / 16),
        (4, 28, 28, 1),
        BINARYNET_CONVS + BINARYNET_DENSE,  # 9 = 6 conv + 3 dense: every kernel
    ),
    "binarynet_sgdat": (
        "binarynet",
        dict(input_shape=(32, 32, 3), width_multiplier=1 / 16, real_first_last=True),
        (4, 32, 32, 3),
        BINARYNET_CONVS[1:] + BINARYNET_DENSE[:-1],  # 7: first conv and last dense are real
    ),
    "resnet18": (
        "resnet18",
        dict(input_shape=(28, 28, 1), num_classes=10, width=4),
        (4, 28, 28, 1),
        RESNET_BINARY,  # 16 binary 3x3 convs; stem, 3 shortcuts, head real
    ),
}


@pytest.fixture(scope="module")
def built():
    """Each configuration built once (parameter initialisation compiles per shape)."""
    cache = {}

    def get(key):
        if key not in cache:
            name, kwargs, _, _ = CONFIGS[key]
            cache[key] = models.get(name, rngs=rngs(), **kwargs)
        return nnx.clone(cache[key])

    return get


def kernel_paths(model, types):
    return sorted(
        "/".join(map(str, path))
        for path, _ in nnx.to_flat_state(nnx.state(model, types))
        if path[-1] == "kernel"
    )


@pytest.mark.parametrize("key", list(CONFIGS))
def test_binary_labels_find_exactly_the_binary_kernels(built, key):
    model = built(key)
    _, _, _, expected = CONFIGS[key]
    labels = bnn.binary_labels(model)
    flat = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(labels)}
    assert sorted(k for k, v in flat.items() if v) == sorted(expected)
    assert sum(jax.tree.leaves(labels)) == len(expected)
    assert kernel_paths(model, bnn.BinaryParam) == sorted(expected)
    for path, var in nnx.to_flat_state(nnx.state(model, bnn.BinaryParam)):
        assert set(np.unique(np.asarray(var.get_value()))) <= {-1.0, 1.0}, path


def test_real_layers_where_the_papers_put_them(built):
    resnet = built("resnet18")
    real = set(kernel_paths(resnet, nnx.Param)) - set(RESNET_BINARY)
    assert real == {
        "stem/kernel",
        "blocks/2/downsample/kernel",
        "blocks/4/downsample/kernel",
        "blocks/6/downsample/kernel",
        "head/kernel",
    }
    assert resnet.stem.kernel.shape == (3, 3, 1, 4)  # small-input stem
    net = built("binarynet")
    # BatchNorm without scale after every layer; the network input is not binarized.
    bns = [m for _, m in nnx.iter_modules(net) if isinstance(m, nnx.BatchNorm)]
    assert len(bns) == 9 and all(bn.scale is None for bn in bns)
    assert net.convs[0].input_quantizer is None
    assert all(c.input_quantizer is not None for c in [*net.convs[1:], *net.dense])
    assert [c.out_features for c in net.convs] == [8, 8, 16, 16, 32, 32]
    sgdat = built("binarynet_sgdat")
    assert type(sgdat.convs[0]) is nnx.Conv
    assert sgdat.dense[-1].input_quantizer is not None and not sgdat.dense[-1].binary_kernel


def test_shapes_and_train_eval_modes(built):
    model = built("mlp")
    forward = nnx.jit(lambda m, x: m(x))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 28, 28, 1)), jnp.float32)
    model.train()
    before = np.asarray(model.norms[0].mean[...])
    y = forward(model, x)
    assert y.shape == (4, 10)
    assert not np.array_equal(before, model.norms[0].mean[...])  # batch stats updated
    model.eval()
    assert all(
        bn.use_running_average for _, bn in nnx.iter_modules(model) if isinstance(bn, nnx.BatchNorm)
    )
    stats = np.asarray(model.norms[0].mean[...])
    y1, y2 = forward(model, x), forward(model, x.at[1:].set(0.0))
    np.testing.assert_array_equal(y1[0], y2[0])  # each example on its own in eval mode
    np.testing.assert_array_equal(stats, model.norms[0].mean[...])


@pytest.mark.parametrize(
    "name,kwargs,shape,out",
    [
        (
            "mlp",
            dict(input_shape=(8, 8, 1), hidden_sizes=(16,), num_classes=3),
            (2, 8, 8, 1),
            (2, 3),
        ),
        (
            "binarynet",
            dict(input_shape=(32, 32, 3), width_multiplier=1 / 32),
            (2, 32, 32, 3),
            (2, 10),
        ),
        ("resnet18", dict(input_shape=(32, 32, 3), num_classes=7, width=2), (2, 32, 32, 3), (2, 7)),
        (
            "resnet18",
            dict(input_shape=(224, 224, 3), num_classes=5, width=2),
            (1, 224, 224, 3),
            (1, 5),
        ),
    ],
)
def test_output_shapes(name, kwargs, shape, out):
    # Abstract models: shapes only, nothing initialised or computed.
    model = nnx.eval_shape(lambda: models.get(name, rngs=nnx.Rngs(0), **kwargs))
    graphdef, state = nnx.split(model)
    spec = jax.ShapeDtypeStruct(shape, jnp.float32)
    y = jax.eval_shape(lambda state, x: nnx.merge(graphdef, state)(x), state, spec)
    assert y.shape == out
    if name == "resnet18" and shape[1] == 224:
        assert model.stem.kernel.shape == (7, 7, 3, 2)


def rngs(seed=0):
    """RBG keys: the same models, but parameter initialisation compiles several times faster."""
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def optimizers():
    """(name, binary optimizer, whether one step must flip some weights, latent)."""
    return [
        ("bop", binax.bop(), True, False),
        ("bop2nd_order", binax.bop2nd_order(), True, False),
        ("sgdat", binax.sgdat(), True, False),
        ("diode", binax.diode(seed=jax.random.key(0, impl="rbg")), False, False),  # flips later
        ("cema", binax.cema(gamma=1e-2, alpha=1e-1), True, False),
        ("latent_adam", optax.chain(optax.adam(1e-2), binax.clip_latent(1.0)), True, True),
    ]


# Compiling with LLVM's cheaper passes halves the compile time of these one-off programs on CPU;
# the computation is the same.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@pytest.mark.parametrize("key", ["mlp", "binarynet", "resnet18"])
def test_one_jitted_step_per_optimizer_keeps_kernels_binary(built, key):
    """One jit-compiled training step of the architecture with every optimizer.

    Each optimizer goes through `binax.partition` (real-valued leaves: SGD) and takes one step
    from the same parameters. The gradient is computed once, and all six steps (optimizer init
    included) are one compiled program, so the test compiles once per architecture.
    """
    model = built(key)
    _, _, shape, expected = CONFIGS[key]
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)
    labels = bnn.binary_labels(model)
    opts = optimizers()
    txs = [
        binax.partition(binary=tx, real=optax.sgd(1e-2), is_binary=labels) for _, tx, _, _ in opts
    ]

    def loss_fn(p, rest, x, y):
        logits = nnx.merge(graphdef, p, rest)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def steps(p, rest, x, y):
        loss, g = jax.value_and_grad(loss_fn)(p, rest, x, y)
        new = []
        for tx in txs:
            u, _ = tx.update(g, tx.init(p), p)
            new.append(optax.apply_updates(p, u))
        return loss, g, new

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, size=shape[0]))
    compiled = jax.jit(steps).lower(params, rest, x, y).compile(FAST_COMPILE)
    loss, grads, new = compiled(params, rest, x, y)
    assert np.isfinite(loss)

    flat = lambda tree: {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(tree)}
    p0, g0 = flat(params), flat(grads)
    for path in expected:  # gradients reach every binary kernel
        assert np.count_nonzero(g0[path]) > 0, path
    for (name, _, must_flip, latent), p1 in zip(opts, new, strict=True):
        p1 = flat(p1)
        flips = 0
        for path in expected:
            w = p1[path]
            if latent:  # latent weights stay in [-1, 1]; the forward pass uses sign0(w)
                assert np.max(np.abs(w)) <= 1.0, (name, path)
            else:
                assert set(np.unique(w)) <= {-1.0, 1.0}, (name, path)
            flips += np.count_nonzero(w != p0[path])  # flips, or moved latent weights
        if must_flip:
            assert flips > 0, name
        real_changed = [k for k in p0 if k not in expected and not np.array_equal(p0[k], p1[k])]
        assert real_changed, name  # the real-valued leaves were trained


def test_nnx_optimizer_end_to_end_with_partition(built):
    """The user path: nnx.Optimizer(model, binax.partition(..., is_binary=model), wrt=Param)."""
    model = built("binarynet_sgdat")
    model.train()
    tx = binax.partition(binary=binax.bop(threshold=0.0), real=optax.adam(1e-3), is_binary=model)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    before = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.as_pure(nnx.state(model)))}

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, size=4))
    for _ in range(2):
        assert np.isfinite(train_step(model, optimizer, x, y))
    flips = 0
    for path, var in nnx.to_flat_state(nnx.state(model, bnn.BinaryParam)):
        w = np.asarray(var.get_value())
        assert set(np.unique(w)) <= {-1.0, 1.0}
        flips += np.count_nonzero(w != before[path])
    assert flips > 0
    assert not np.array_equal(model.convs[0].kernel[...], before[("convs", 0, "kernel")])
    assert int(optimizer.step[...]) == 2


def test_registry_and_errors():
    assert set(models.names()) == {"mlp", "binarynet", "resnet18", "vit", "encoder"}
    with pytest.raises(ValueError, match="name.*'vgg'.*'mlp', 'binarynet', 'resnet18'"):
        models.get("vgg", rngs=rngs())
    with pytest.raises(ValueError, match="input_shape"):
        models.BinaryNet((32, 32), rngs=rngs())
    with pytest.raises(ValueError, match="input_shape.*too small"):
        models.BinaryNet((4, 4, 3), rngs=rngs())
    with pytest.raises(ValueError, match="width_multiplier"):
        models.BinaryNet(width_multiplier=0, rngs=rngs())
    with pytest.raises(ValueError, match="stem"):
        models.BinaryResNet18((32, 32, 3), stem="tiny", rngs=rngs())
    with pytest.raises(ValueError, match="width"):
        models.BinaryResNet18((32, 32, 3), width=0, rngs=rngs())
    with pytest.raises(ValueError, match="hidden_sizes"):
        models.BinaryMLP((8, 8, 1), hidden_sizes=(0,), rngs=rngs())
    with pytest.raises(ValueError, match="pad_value"):
        models.BinaryNet((32, 32, 3), width_multiplier=1 / 32, pad_value=0.0, rngs=rngs())


def test_integer_arithmetic_trains_flip_exactly_like_float():
    """The default integer products change nothing: logits, loss, every gradient and the Bop
    flips of a training step are bit-identical to the float products (same backward), and
    the patch-product kernel gradients agree with XLA's within float rounding.

    The forward and backward passes run op by op (not jitted), so that the float operations
    around the products (BatchNorm, the loss) are the same compiled computations in both runs:
    under one `jit` XLA may fuse them differently around an int32 -> float32 conversion (it
    does at optimization level 0), and a one-ulp change in a BatchNorm output that sits near
    zero flips a sign downstream. The optimizer step after them sees only the gradients: one
    jitted function for the three runs."""
    name, kwargs, shape, _ = CONFIGS["binarynet"]
    nets = {
        a: models.get(name, rngs=rngs(), arithmetic=a, kernel_grad="patches", **kwargs)
        for a in ("integer", "float")
    }
    nets["xla"] = models.get(name, rngs=rngs(), arithmetic="float", kernel_grad="xla", **kwargs)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, size=shape[0]))
    # The three nets have one architecture: the same binary labels, one optimizer, and its
    # step compiled once for all three (its inputs are the gradients compared below).
    labels = bnn.binary_labels(nets["integer"])
    for model in nets.values():
        other = bnn.binary_labels(model)
        assert jax.tree.structure(other) == jax.tree.structure(labels)
        assert jax.tree.leaves(other) == jax.tree.leaves(labels)
    tx = binax.partition(binary=binax.bop(threshold=1e-6), real=optax.adam(1e-2), is_binary=labels)

    @jax.jit
    def optimizer_step(g, params):
        u, _ = tx.update(g, tx.init(params), params)
        return optax.apply_updates(params, u)

    results = {}
    for a, model in nets.items():
        model.train()
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        params, rest = nnx.as_pure(params), nnx.as_pure(rest)

        def loss_fn(p, rest, graphdef=graphdef):
            model = nnx.merge(graphdef, p, rest)
            logits = model(x)
            new_rest = nnx.as_pure(nnx.state(model, nnx.Not(nnx.Param)))
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (
                logits,
                new_rest,
            )

        (loss, (logits, _)), g = jax.value_and_grad(loss_fn, has_aux=True)(params, rest)
        results[a] = (logits, loss, g), optimizer_step(g, params)
        flips = sum(
            int(np.sum(np.asarray(u) != np.asarray(v)))
            for u, v, b in zip(
                jax.tree.leaves(params),
                jax.tree.leaves(results[a][1]),
                jax.tree.leaves(labels),
                strict=True,
            )
            if b
        )
        assert flips > 0, a  # Bop flipped weights: the comparison covers flips
    leaves = {a: jax.tree.leaves(r) for a, r in results.items()}
    for u, v in zip(leaves["integer"], leaves["float"], strict=True):
        np.testing.assert_array_equal(u, v)
    # XLA's kernel gradients: same logits and loss; gradients within rounding.
    (lf, ls, gf), (lx, lsx, gx) = results["float"][0], results["xla"][0]
    np.testing.assert_array_equal(lf, lx)
    np.testing.assert_array_equal(ls, lsx)
    for u, v in zip(jax.tree.leaves(gf), jax.tree.leaves(gx), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(v))))
