"""Convolutions at most 2 wide, and overlapping max pooling: XLA:CPU's own against binax's.

XLA:CPU's convolution takes 10-50x longer than its FLOPs warrant when the input or the output
is at most 2 wide in every spatial axis (a ResNet's last stages on 32x32 images; the input gradient
of a stride-2 layer whose output is 2x2), so `binax.nn.functional.binary_conv` computes those as
one matrix product of patches (`binax.nn.functional.SMALL_CONV_WIDTH`). This times, per layer
(3x3 kernel, +1 padding, ``ste_sign`` on input and kernel, ``--arithmetic``), the forward pass
and the input gradient with XLA's convolution (``SMALL_CONV_WIDTH = 0``) and with binax's
default, and ResNet's 3x3 stride-2 ``'SAME'`` stem pooling forward and backward with
``flax.nnx.max_pool`` and `binax.nn.functional.max_pool`; all interleaved round by round, median
CPU time (``process_time``) in ms.

Usage::

    python benchmarks/small_conv.py
    python benchmarks/small_conv.py --layers 2x2x256x256s1 4x4x128x256s2 --rounds 9
    python benchmarks/small_conv.py --quick
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

LAYERS = ["8x8x64x64s1", "4x4x128x128s1", "4x4x128x256s2", "2x2x256x256s1", "1x1x512x512s1"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", nargs="+", default=LAYERS, help="HxWxCinxCout and sSTRIDE")
    p.add_argument("--pool", default="16x16x64", help="HxWxC of the max pooling input")
    p.add_argument("--arithmetic", default="auto", help="binary_conv's arithmetic")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="batch 32, two layers, 3 rounds")
    args = p.parse_args(argv)
    if args.quick:
        args.batch_size, args.rounds, args.layers = 32, 3, ["4x4x128x256s2", "2x2x256x256s1"]

    import jax
    import numpy as np
    from flax import nnx

    from binax.nn import functional as F

    def conv(width):
        def forward(x, k):
            F.SMALL_CONV_WIDTH = width  # read while tracing
            return F.binary_conv(x, k, strides=stride, arithmetic=args.arithmetic)

        return forward

    def timed(fns, *operands):
        """Median CPU ms of each jitted function, interleaved."""
        fns = {name: jax.jit(f) for name, f in fns.items()}
        for f in fns.values():
            jax.block_until_ready(f(*operands))  # compile (traces with its setting)
        cpu = {name: [] for name in fns}
        for _ in range(args.rounds):
            for name, f in fns.items():
                t0 = time.process_time()
                jax.block_until_ready(f(*operands))
                cpu[name].append(time.process_time() - t0)
        return {name: 1e3 * _common.median_iqr(v)[0] for name, v in cpu.items()}

    print(f"Command: `{_common.command()}`\n{_common.machine()}\n")
    print(f"Batch {args.batch_size}; median CPU ms of {args.rounds} interleaved rounds\n")
    default = F.SMALL_CONV_WIDTH
    rng = np.random.default_rng(0)
    rows = []
    for layer in args.layers:
        shape, stride = layer.split("s")
        h, w, ci, co = (int(s) for s in shape.split("x"))
        stride = int(stride)
        x = rng.standard_normal((args.batch_size, h, w, ci)).astype(np.float32)
        k = rng.standard_normal((3, 3, ci, co)).astype(np.float32)
        g = rng.standard_normal(jax.eval_shape(conv(default), x, k).shape).astype(np.float32)
        fns = {}
        for name, width in (("XLA", 0), ("binax", default)):
            f = conv(width)
            fns[f"forward, {name}"] = lambda x, k, g, f=f: f(x, k)
            fns[f"input grad, {name}"] = lambda x, k, g, f=f: jax.vjp(lambda x: f(x, k), x)[1](g)[0]
        ms = timed(fns, x, k, g)
        cells = [f"{ms[n]:.1f}" for n in fns]
        speedup = [ms[f"{kind}, XLA"] / ms[f"{kind}, binax"] for kind in ("forward", "input grad")]
        rows.append([layer, *cells, *(f"{s:.1f}x" for s in speedup)])
    F.SMALL_CONV_WIDTH = default
    head = ("layer", *fns, "forward speed-up", "input grad speed-up")
    print(_common.md_table(head, rows))

    h, w, c = (int(s) for s in args.pool.split("x"))
    x = rng.standard_normal((args.batch_size, h, w, c)).astype(np.float32)

    def pool_grad(pool):
        return lambda x: jax.grad(lambda x: (pool(x) ** 2).sum())(x)

    ms = timed(
        {
            "flax.nnx.max_pool": pool_grad(
                lambda x: nnx.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
            ),
            "binax max_pool": pool_grad(lambda x: F.max_pool(x, 3, 2, "SAME")),
        },
        x,
    )
    print(f"\n3x3 stride-2 'SAME' max pooling of {args.pool}, forward + backward:\n")
    rows = [[name, f"{v:.1f}"] for name, v in ms.items()]
    print(_common.md_table(("pooling", "CPU ms"), rows))


if __name__ == "__main__":
    main()
