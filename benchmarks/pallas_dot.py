"""The Pallas packed ±1 product (`binax.deploy.pallas.packed_dot`) against XLA's dots.

For each ``MxKxN`` shape (the binary layers of BinaryNet at batch 256 as `binax.deploy` runs
them: ``M`` output pixels, ``K`` the fan-in, ``N`` output channels), random ±1 operands:
checks that ``packed_dot`` on the bits equals the int8 product with int32 accumulation
exactly, then times, interleaved round by round, ``packed_dot`` (bits in, int32 out), XLA's
int8 dot (``preferred_element_type=int32``) and its float32 and bfloat16 dots (float32 out).
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

SHAPES = ["200704x288x32", "50176x576x64", "12544x1152x128", "200704x576x64", "256x4608x1024"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=SHAPES, help="MxKxN of each product")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="small shapes, 3 rounds (CPU dry run)")
    args = p.parse_args(argv)
    from binax.deploy.pallas import packed_dot
    from binax.deploy.program import pack_kernel

    interpret = jax.default_backend() == "cpu"
    if args.quick:
        args.shapes, args.rounds = ["64x300x40", "32x64x128"], 3
    print(f"Command: `{_common.command()}`\n{_common.machine()}\n")
    dims = (((1,), (0,)), ((), ()))
    rows = []
    for shape in args.shapes:
        m, k, n = (int(s) for s in shape.split("x"))
        rng = np.random.default_rng(0)
        x = np.where(rng.random((m, k)) < 0.5, -1, 1).astype(np.int8)
        w = np.where(rng.random((k, n)) < 0.5, -1, 1).astype(np.int8)
        x_bits = jnp.packbits(jnp.asarray(x) > 0, axis=-1)
        w_bits = jnp.asarray(pack_kernel(w))
        cases = {
            "pallas packed": (
                lambda a, b, k=k: packed_dot(a, b, k, interpret=interpret),
                x_bits,
                w_bits,
            ),
        }
        for name, dtype, out in [
            ("XLA int8", jnp.int8, jnp.int32),
            ("XLA float32", jnp.float32, jnp.float32),
            ("XLA bfloat16", jnp.bfloat16, jnp.float32),
        ]:
            f = jax.jit(
                lambda a, b, out=out: jax.lax.dot_general(a, b, dims, preferred_element_type=out)
            )
            cases[name] = (f, jnp.asarray(x, dtype), jnp.asarray(w, dtype))
        exact = np.asarray(cases["XLA int8"][0](*cases["XLA int8"][1:]))
        same = np.array_equal(np.asarray(cases["pallas packed"][0](x_bits, w_bits)), exact)
        times = {name: [] for name in cases}
        for f, a, b in cases.values():
            jax.block_until_ready(f(a, b))
        for _ in range(args.rounds):
            for name, (f, a, b) in cases.items():
                t = time.perf_counter()
                jax.block_until_ready(f(a, b))
                times[name].append(time.perf_counter() - t)
        for name, ts in times.items():
            med = float(np.median(ts))
            rows.append(
                (
                    shape,
                    name,
                    f"{med * 1e3:.3f}",
                    f"{2 * m * k * n / med / 1e9:.0f}",
                    "yes" if name != "pallas packed" else ("yes" if same else "NO"),
                )
            )
        print(f"{shape}: packed == int8 product: {same}", flush=True)
    print()
    print(_common.md_table(("MxKxN", "product", "median ms", "GOP/s", "exact"), rows))
    return 0 if all(r[-1] == "yes" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
