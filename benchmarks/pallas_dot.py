"""The Pallas packed ±1 product (`binax.deploy.pallas.packed_dot`) against XLA's dots.

For each ``MxKxN`` shape (the binary layers of BinaryNet at batch 256 as `binax.deploy` runs
them: ``M`` output pixels, ``K`` the fan-in, ``N`` output channels), random ±1 operands: the
products of `inference.kernel_products` (XLA's int8 dot with int32 accumulation, XOR +
popcount in XLA, and ``packed_dot`` on the bits, all checked equal to the int8 product), and
XLA's float32 and bfloat16 dots (float32 out), timed interleaved round by round.
Reported: median ms and GOP/s (``2 M K N`` per product). Meant for a GPU; on the CPU the kernel
runs in Pallas' interpreter (``--quick``: small shapes, to check the script).

Usage::

    python benchmarks/pallas_dot.py            # on a GPU
    python benchmarks/pallas_dot.py --quick    # dry run on the CPU (interpreter)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import inference  # noqa: E402

SHAPES = ["200704x288x32", "50176x576x64", "12544x1152x128", "200704x576x64", "256x4608x1024"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=SHAPES, help="MxKxN of each product")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="small shapes, 3 rounds (CPU dry run)")
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.rounds = ["64x300x40", "32x64x128"], 3
    print(f"Command: `{_common.command()}`\n{_common.machine()}\n")
    rows = []
    for shape in args.shapes:
        m, k, n = (int(s) for s in shape.split("x"))
        cases = inference.kernel_products((m, k, n), pallas=True)
        a, b = cases["int8 product"][1]
        for name, dtype in [("float32 dot", jnp.float32), ("bfloat16 dot", jnp.bfloat16)]:
            f = jax.jit(lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.float32))
            cases[name] = (f, (a.astype(dtype), b.astype(dtype)))
        times = {name: [] for name in cases}
        for f, operands in cases.values():
            jax.block_until_ready(f(*operands))
        for _ in range(args.rounds):
            for name, (f, operands) in cases.items():
                t = time.perf_counter()
                jax.block_until_ready(f(*operands))
                times[name].append(time.perf_counter() - t)
        for name, ts in times.items():
            med = float(np.median(ts))
            rows.append((shape, name, f"{med * 1e3:.3f}", f"{2 * m * k * n / med / 1e9:.0f}"))
    print(_common.md_table(("MxKxN", "product", "median ms", "GOP/s"), rows))
    print("\nThe packed products equal the int8 product exactly (checked for every shape).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
