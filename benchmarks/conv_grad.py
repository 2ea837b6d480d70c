"""The cost of one binary convolution's forward pass, input gradient and kernel gradient.

Times, for each layer shape (3x3, ``'SAME'``, +1 padding, ``ste_sign`` on input and kernel,
batch ``--batch-size``), the jitted forward pass (binax's popcount kernel, the default; XLA's
int8 convolution; float32), the input gradient alone (binax's, and lax's transpose of the
plain convolution, which XLA:CPU gives to YNNPACK) and the kernel gradient alone (binax's CPU
kernel, ``kernel_grad='direct'``; the patch product with each ``--chunk-rows`` budget of
`binax.nn.functional.PATCH_CHUNK_ROWS`, output positions per chunk; and XLA's kernel-gradient
convolution), all interleaved round by round; prints the median CPU time (``process_time``)
of each, in ms, the median wall time, and how many cores each kept busy (median CPU time over
median wall time: 1.0 is one thread). The CPU time is the steadier measure on a shared
machine; the ratios between columns are what to compare.

Usage::

    python benchmarks/conv_grad.py                              # BinaryNet x0.25's layers
    python benchmarks/conv_grad.py --chunk-rows 1000000 512 2048 8192  # 1e6: the whole batch
    python benchmarks/conv_grad.py --shapes 14x14x64x64 --rounds 9
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--shapes",
        nargs="+",
        default=["28x28x32x32", "14x14x32x64", "14x14x64x64", "7x7x64x128", "7x7x128x128"],
        help="HxWxCinxCout of each layer",
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--chunk-rows", type=int, nargs="+", default=[2048, 10**6])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)

    import jax
    import numpy as np

    from binax.nn import functional as F

    def kernel_grad(budget, how):
        def f(x, k, g):
            F.PATCH_CHUNK_ROWS = budget  # read while tracing
            return jax.vjp(lambda k: F.binary_conv(x, k, kernel_grad=how), k)[1](g)[0]

        return f

    def input_grad(lax_transpose):
        def f(x, k, g):
            saved, F.EIGEN_INPUT_GRADIENT = F.EIGEN_INPUT_GRADIENT, not lax_transpose
            try:  # read while tracing
                return jax.vjp(lambda x: F.binary_conv(x, k), x)[1](g)[0]
            finally:
                F.EIGEN_INPUT_GRADIENT = saved

        return f

    default = F.PATCH_CHUNK_ROWS

    def int8_forward(x, k, g):
        saved, F.BINARY_POPCOUNT = F.BINARY_POPCOUNT, False
        try:  # read while tracing
            return F.binary_conv(x, k)
        finally:
            F.BINARY_POPCOUNT = saved

    cases = {
        "forward popcount": lambda x, k, g: F.binary_conv(x, k),
        "forward int8": int8_forward,
        "forward float32": lambda x, k, g: F.binary_conv(x, k, arithmetic="float"),
        "input grad": input_grad(lax_transpose=False),
        "input grad, lax's transpose": input_grad(lax_transpose=True),
    }
    cases["kernel grad, direct"] = kernel_grad(default, "direct")
    for rows in args.chunk_rows:
        cases[f"kernel grad, {rows} rows a chunk"] = kernel_grad(rows, "patches")
    cases["kernel grad, XLA conv"] = kernel_grad(default, "xla")

    print(f"Command: `{_common.command()}`\n{_common.machine()}\n")
    print(f"Batch {args.batch_size}; median CPU ms of {args.rounds} interleaved rounds\n")
    rng = np.random.default_rng(0)
    rows, walls, cores = [], [], []
    for shape in args.shapes:
        h, w, ci, co = (int(s) for s in shape.split("x"))
        x = rng.standard_normal((args.batch_size, h, w, ci)).astype(np.float32)
        k = rng.standard_normal((3, 3, ci, co)).astype(np.float32)
        g = rng.standard_normal((args.batch_size, h, w, co)).astype(np.float32)
        fns = {}
        for name, f in cases.items():
            fns[name] = jax.jit(f)
            jax.block_until_ready(fns[name](x, k, g))  # compile (traces with its budget)
        cpu = {name: [] for name in fns}
        wall = {name: [] for name in fns}
        for _ in range(args.rounds):
            for name, f in fns.items():
                t0, w0 = time.process_time(), time.perf_counter()
                jax.block_until_ready(f(x, k, g))
                cpu[name].append(time.process_time() - t0)
                wall[name].append(time.perf_counter() - w0)
        med = {n: (_common.median_iqr(cpu[n])[0], _common.median_iqr(wall[n])[0]) for n in fns}
        rows.append([shape, *(f"{1e3 * med[n][0]:.0f}" for n in fns)])
        walls.append([shape, *(f"{1e3 * med[n][1]:.1f}" for n in fns)])
        cores.append([shape, *(f"{med[n][0] / med[n][1]:.2f}" for n in fns)])
    F.PATCH_CHUNK_ROWS = default
    print(_common.md_table(("layer HxWxCinxCout", *cases), rows))
    print("\nMedian wall ms:\n")
    print(_common.md_table(("layer HxWxCinxCout", *cases), walls))
    print("\nCores busy (median CPU time / median wall time):\n")
    print(_common.md_table(("layer HxWxCinxCout", *cases), cores))


if __name__ == "__main__":
    main()
