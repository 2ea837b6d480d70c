"""Binary transformers: shapes, binary leaves, intermediates, one step per optimizer, FP twins."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import binax
from binax import models
from binax import nn as bnn

VIT = dict(input_shape=(28, 28, 1), patch_size=7, features=8, depth=2, num_heads=2)
ENCODER = dict(vocab_size=20, num_classes=3, max_length=6, features=8, depth=2, num_heads=2)
# Per block: the fused q/k/v, the output projection and the two MLP kernels.
BLOCK_KERNELS = ["attention/qkv/kernel", "attention/out/kernel", "mlp_in/kernel", "mlp_out/kernel"]


def rngs(seed=0):
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


_CACHE = {}


def build(cls, **kwargs):
    """Each configuration built once per session (initialisation compiles per shape)."""
    key = (cls.__name__, tuple(sorted(kwargs.items())))
    if key not in _CACHE:
        _CACHE[key] = cls(**kwargs, rngs=rngs())
    return nnx.clone(_CACHE[key])


@nnx.jit(static_argnames="intermediates")
def forward(model, *args, intermediates=True):
    return model(*args, return_intermediates=intermediates)


def binary_paths(model):
    labels = nnx.to_flat_state(bnn.binary_labels(model))
    return sorted("/".join(map(str, k)) for k, b in labels if b)


def expected(depth, extra=()):
    return sorted([f"blocks/{i}/{k}" for i in range(depth) for k in BLOCK_KERNELS] + list(extra))


def images(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)


TOKENS = jnp.array([[1, 5, 7, 2, 0, 0], [1, 9, 3, 4, 8, 2]])


def test_vit_shapes_binary_kernels_and_intermediates():
    registered = nnx.eval_shape(lambda: models.get("vit", rngs=nnx.Rngs(0), **VIT))
    assert type(registered) is models.BinaryViT
    model = build(models.BinaryViT, **VIT)
    assert binary_paths(model) == expected(2)
    out = forward(model, images((3, 28, 28, 1)))
    assert isinstance(out, models.TransformerOutput)
    assert out.logits.shape == (3, 10)
    assert len(out.hidden_states) == 3 and all(h.shape == (3, 17, 8) for h in out.hidden_states)
    assert len(out.attentions) == 2
    assert out.attentions[0].scores.shape == out.attentions[0].probs.shape == (3, 2, 17, 17)
    np.testing.assert_allclose(np.sum(out.attentions[1].probs, -1), 1.0, rtol=1e-5)
    # Everything binarizable binarized: patch embedding and head join the binary kernels.
    full = build(models.BinaryViT, **VIT, binary_patch_embedding=True, binary_head=True)
    assert binary_paths(full) == expected(2, ["patch_embedding/kernel", "head/kernel"])


def test_vit_on_32x32_rgb():
    model = nnx.eval_shape(
        lambda: models.BinaryViT(
            (32, 32, 3), 5, patch_size=8, features=8, depth=1, num_heads=2, rngs=nnx.Rngs(0)
        )
    )
    spec = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    graphdef, state = nnx.split(model)
    y = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, spec)
    assert y.shape == (2, 5)
    assert model.position_embedding.shape == (1, 17, 8)  # 16 patches and the class token


def test_encoder_shapes_binary_kernels_and_padding():
    model = build(models.BinaryEncoder, **ENCODER)
    assert binary_paths(model) == expected(2, ["word_embedding/embedding"])
    out = forward(model, TOKENS)
    assert out.logits.shape == (2, 3)
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (2, 6, 8)
    # Padding (id 0) gets no attention; changing it changes nothing else.
    np.testing.assert_array_equal(np.asarray(out.attentions[0].probs)[0, :, :, 4:], 0.0)
    y = forward(model, TOKENS.at[0, 4:].set(5), None, TOKENS != 0, intermediates=False)
    np.testing.assert_allclose(y, out.logits, rtol=1e-6)
    types = jnp.ones_like(TOKENS)
    y = forward(model, TOKENS, types, intermediates=False)
    assert not np.allclose(y, out.logits)  # segments are embedded
    # Ids, types and mask stacked as one (batch, 3, length) array (binax-train's rows).
    mask = (TOKENS != 0).astype(TOKENS.dtype)
    stacked = forward(model, jnp.stack([TOKENS, types, mask], 1), intermediates=False)
    np.testing.assert_array_equal(stacked, forward(model, TOKENS, types, mask, intermediates=False))
    real_embeddings = build(models.BinaryEncoder, **ENCODER, binary_embeddings=False)
    assert binary_paths(real_embeddings) == expected(2)


@pytest.mark.parametrize("name", ["vit", "encoder"])
def test_full_precision_twin_has_no_binary_parameters(name):
    kwargs = VIT if name == "vit" else ENCODER
    cls = models.BinaryViT if name == "vit" else models.BinaryEncoder
    teacher = build(cls, **kwargs, binary=False)
    assert binary_paths(teacher) == []
    params = nnx.to_flat_state(nnx.state(teacher, nnx.Param))
    assert not any("binarization" in "/".join(map(str, k)) for k, _ in params)
    with pytest.raises(ValueError, match="marks no leaf as binary"):
        binax.partition(binax.bop(), optax.adam(1e-3), is_binary=teacher).init(
            nnx.as_pure(nnx.state(teacher, nnx.Param))
        )
    x = images((2, 28, 28, 1)) if name == "vit" else TOKENS
    student = build(cls, **kwargs)
    # Same architecture: the twin's hidden states and attention line up with the student's.
    t, s = jax.eval_shape(forward, teacher, x), jax.eval_shape(forward, student, x)
    assert [h.shape for h in t.hidden_states] == [h.shape for h in s.hidden_states]
    assert [a.scores.shape for a in t.attentions] == [a.scores.shape for a in s.attentions]


def optimizers():
    """(name, binary optimizer, latent)."""
    return [
        ("bop", binax.bop(threshold=0.0), False),
        ("bop2nd_order", binax.bop2nd_order(threshold=0.0), False),
        ("sgdat", binax.sgdat(), False),
        ("diode", binax.diode(seed=jax.random.key(0, impl="rbg")), False),
        ("latent_adam", optax.chain(optax.adam(1e-2), binax.clip_latent(1.0)), True),
    ]


FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@pytest.mark.parametrize("name", ["vit", "encoder"])
def test_one_jitted_step_per_optimizer(name):
    """One compiled program: the gradient, then one partitioned step of every optimizer."""
    kwargs = VIT if name == "vit" else ENCODER
    cls = models.BinaryViT if name == "vit" else models.BinaryEncoder
    model = build(cls, **kwargs)
    x = images((4, 28, 28, 1)) if name == "vit" else jnp.tile(TOKENS, (2, 1))
    y = jnp.array([0, 1, 2, 1])
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)
    opts = optimizers()
    txs = [binax.partition(tx, optax.adam(1e-2), is_binary=model) for _, tx, _ in opts]

    def loss_fn(p, x, y):
        logits = nnx.merge(graphdef, p, rest)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def steps(p, x, y):
        loss, g = jax.value_and_grad(loss_fn)(p, x, y)
        new = []
        for tx in txs:
            u, _ = tx.update(g, tx.init(p), p)
            new.append(optax.apply_updates(p, u))
        return loss, g, new

    loss, grads, new = jax.jit(steps).lower(params, x, y).compile(FAST_COMPILE)(params, x, y)
    assert np.isfinite(loss)
    flat = lambda t: {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(t)}
    p0, g0 = flat(params), flat(grads)
    binary = set(binary_paths(model))
    elastic = [k for k in p0 if "binarization" in k]
    assert len(elastic) == 2 * 8 * 2  # scale and threshold of 8 binarizers in each of 2 blocks
    for k in [*binary, *elastic]:  # gradients reach the binary kernels, scales and thresholds
        assert np.count_nonzero(g0[k]) > 0, k
    for (opt, _, latent), p1 in zip(opts, new, strict=True):
        p1 = flat(p1)
        moved = 0
        for k in binary:
            if latent:
                assert np.max(np.abs(p1[k])) <= 1.0, (opt, k)
            else:
                assert set(np.unique(p1[k])) <= {-1.0, 1.0}, (opt, k)
            moved += np.count_nonzero(p1[k] != p0[k])
        if opt != "diode":  # Diode's first step flips nothing by design
            assert moved > 0, opt
        real_changed = [k for k in elastic if not np.array_equal(p0[k], p1[k])]
        assert len(real_changed) == len(elastic), opt  # Adam moved every scale and threshold


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"patch_size \(5\) must divide.*28x28"):
        models.BinaryViT(patch_size=5, rngs=rngs())
    with pytest.raises(ValueError, match="input_shape must be"):
        models.BinaryViT((28, 28), rngs=rngs())
    with pytest.raises(ValueError, match="depth must be a positive int"):
        models.BinaryViT(**{**VIT, "depth": 0}, rngs=rngs())
    model = build(models.BinaryEncoder, **ENCODER)
    with pytest.raises(ValueError, match="input length 7 exceeds max_length 6"):
        model(jnp.ones((1, 7), jnp.int32))
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, length\) or \(batch, 3,"):
        model(jnp.ones((1, 4)))
    vit = build(models.BinaryViT, **VIT)
    with pytest.raises(ValueError, match=r"x must be \(batch, 28, 28, 1\)"):
        vit(jnp.ones((2, 32, 32, 1)))


def test_summary_counts_binary_projections_as_one_bit():
    model = build(models.BinaryViT, **VIT)
    layers = {r["path"]: r for r in binax.summary(model, (1, 28, 28, 1), print_fn=None).layers}
    qkv = layers["blocks/0/attention/qkv"]
    assert qkv["input_precision"] == 1 and qkv["real_macs"] == 0
    assert qkv["binary_macs"] == 17 * 8 * 24  # 17 tokens, 8 inputs, 24 outputs
    assert layers["patch_embedding"]["input_precision"] == 32  # real by default, as in BiT
    assert layers["head"]["binary_macs"] == 0


def random_output(rng, batch=2, length=5, features=4, heads=2, depth=2, classes=3):
    arr = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    return models.TransformerOutput(
        arr(batch, classes),
        tuple(arr(batch, length, features) for _ in range(depth + 1)),
        tuple(
            bnn.Attention(arr(batch, heads, length, length), arr(batch, heads, length, length))
            for _ in range(depth)
        ),
    )


def test_distillation_loss_against_numpy():
    rng = np.random.default_rng(0)
    s, t = random_output(rng), random_output(rng)
    valid = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    loss, parts = models.distillation_loss(
        s, t, temperature=2.0, attention_weight=0.5, hidden_weight=3.0, mask=jnp.asarray(valid)
    )
    n = lambda x: np.asarray(x, np.float64)  # noqa: E731
    z = n(t.logits) / 2
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    zs = n(s.logits) / 2
    log_q = zs - zs.max(-1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
    want_logits = -np.mean(np.sum(p * log_q, -1)) * 4
    pair = valid[:, None, :, None] & valid[:, None, None, :]
    want_att = np.mean(
        [
            np.sum(((n(a.scores) - n(b.scores)) ** 2) * np.broadcast_to(pair, a.scores.shape))
            / np.broadcast_to(pair, a.scores.shape).sum()
            for a, b in zip(s.attentions, t.attentions, strict=True)
        ]
    )
    want_hidden = np.mean(
        [
            np.sum(((n(a) - n(b)) ** 2)[valid]) / (valid.sum() * a.shape[-1])
            for a, b in zip(s.hidden_states, t.hidden_states, strict=True)
        ]
    )
    np.testing.assert_allclose(parts["logits"], want_logits, rtol=1e-5)
    np.testing.assert_allclose(parts["attention"], want_att, rtol=1e-5)
    np.testing.assert_allclose(parts["hidden"], want_hidden, rtol=1e-5)
    np.testing.assert_allclose(loss, want_logits + 0.5 * want_att + 3.0 * want_hidden, rtol=1e-5)
    # Regression (one output): squared error of the outputs.
    s1 = s._replace(logits=s.logits[:, :1])
    t1 = t._replace(logits=t.logits[:, :1])
    _, parts = models.distillation_loss(s1, t1)
    np.testing.assert_allclose(parts["logits"], np.mean((n(s1.logits) - n(t1.logits)) ** 2))


def test_distillation_gradients_reach_the_student_only():
    rng = np.random.default_rng(1)
    s, t = random_output(rng), random_output(rng)
    g_s, g_t = jax.grad(lambda a, b: models.distillation_loss(a, b)[0], argnums=(0, 1))(s, t)
    assert all(np.count_nonzero(x) for x in jax.tree.leaves(g_s.hidden_states))
    assert all(np.count_nonzero(a.scores) for a in g_s.attentions)
    assert not any(np.count_nonzero(x) for x in jax.tree.leaves(g_t))  # the teacher is constant
    # At the teacher's values the student's gradient is zero.
    g_same = jax.grad(lambda a: models.distillation_loss(a, t)[0])(t)
    for x in jax.tree.leaves(g_same.logits) + jax.tree.leaves(g_same.hidden_states):
        np.testing.assert_allclose(x, 0.0, atol=1e-7)
    with pytest.raises(ValueError, match="do not line up"):
        models.distillation_loss(random_output(rng, depth=1), t)
    with pytest.raises(ValueError, match="temperature must be positive"):
        models.distillation_loss(s, t, temperature=0.0)


def test_distilling_a_binary_vit_from_its_twin():
    """The student's binary kernels, scales and thresholds all get gradients from the loss."""
    student = build(models.BinaryViT, **VIT)
    teacher = build(models.BinaryViT, **VIT, binary=False)
    x = images((2, 28, 28, 1))
    t = forward(teacher, x)
    graphdef, params, rest = nnx.split(student, nnx.Param, ...)

    def loss(p):
        out = nnx.merge(graphdef, p, rest)(x, return_intermediates=True)
        return models.distillation_loss(out, t)[0]

    grads = jax.jit(jax.grad(loss))(nnx.as_pure(params))
    flat = {"/".join(map(str, k)): np.asarray(g) for k, g in nnx.to_flat_state(grads)}
    for k in binary_paths(student) + [k for k in flat if "binarization" in k]:
        assert np.count_nonzero(flat[k]) > 0, k
