"""Quickstart: a binary MLP on scikit-learn's digits, trained with Bop, in plain JAX + Optax.

Binary kernels (+1/-1) are trained by `binax.bop`; biases and BatchNorm-free output scale are
real-valued and trained by Adam, through `binax.partition`. Run: python examples/quickstart.py
"""

import jax
import jax.numpy as jnp
import optax

import binax
from binax import data
from binax.quantizers import ste_sign


def init(key, sizes=(64, 256, 256, 10)):
    keys = jax.random.split(key, len(sizes) - 1)
    return {
        f"layer{i}": {
            # Binary kernels start exactly at +1/-1.
            "kernel": jnp.where(jax.random.bernoulli(k, 0.5, (n_in, n_out)), 1.0, -1.0),
            "bias": jnp.zeros(n_out),
        }
        for i, (k, n_in, n_out) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True))
    }


def forward(params, x):
    h = x.reshape(x.shape[0], -1)
    for i, layer in enumerate(params.values()):
        if i:  # binary activations, except on the network input
            h = ste_sign(h)
        h = (h @ layer["kernel"]) / jnp.sqrt(h.shape[-1]) + layer["bias"]
    return h


def loss_fn(params, x, y):
    logits = forward(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def main(epochs=30, batch_size=64, seed=0):
    train, test = data.load("digits", "train", seed=seed), data.load("digits", "test", seed=seed)
    params = init(jax.random.key(seed))
    tx = binax.partition(
        binary=binax.bop(threshold=1e-5, gamma=1e-3),
        real=optax.adam(1e-2),
        is_binary=lambda path: path[-1] == "kernel",
    )
    state = tx.init(params)

    @jax.jit
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        new = optax.apply_updates(params, updates)
        flips = binax.flip_metrics(params, new, is_binary=lambda p: p[-1] == "kernel")["flips"]
        return new, state, loss, flips

    accuracy = jax.jit(lambda p, x, y: jnp.mean(jnp.argmax(forward(p, x), -1) == y))
    for epoch in range(epochs):
        flips = 0
        for batch in data.batches(train, batch_size, seed=seed, epoch=epoch):
            params, state, loss, f = step(params, state, batch.images, batch.labels)
            flips += int(f)
        if epoch % 5 == 4 or epoch == epochs - 1:
            acc = accuracy(params, test.images, test.labels)
            print(
                f"epoch {epoch + 1:3d}  loss {float(loss):.3f}  flips {flips:6d}  "
                f"test accuracy {float(acc):.3f}"
            )
    kernels = [p["kernel"] for p in params.values()]
    assert all(bool(jnp.all(jnp.abs(k) == 1)) for k in kernels), "kernels left {-1, +1}"
    print(f"final test accuracy: {float(accuracy(params, test.images, test.labels)):.4f}")


if __name__ == "__main__":
    main()
