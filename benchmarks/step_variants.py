"""BinaryNet's training step with and without binax's CPU paths, side by side.

Builds binax's jitted training step (`_common.binarynet_step`: BinaryNet at ``--width``,
28x28x1, batch 256, Bop + Adam; or with ``--model birealnet`` Bi-Real Net 18 on 32x32x3 as
`vs_larq.py` builds it) once per variant in one process, each traced with
`binax.nn.functional` set as the variant says, then times them interleaved round by round and
prints the median wall and CPU time per step. Variants:

- ``default``: the library as it is;
- ``int8-forward``: convolutions of signs as XLA's int8 convolutions, not binax's bit kernel
  (`binax.nn.functional.BINARY_POPCOUNT` off);
- ``kernel-grad=HOW``: the layers' ``kernel_grad`` (``direct``, the CPU default; ``patches``;
  ``xla``);
- ``lax-input-grad``: the input gradient as JAX's transpose of the plain convolution, which
  XLA:CPU hands to YNNPACK (`binax.nn.functional.EIGEN_INPUT_GRADIENT` off);
- ``rows=N`` (with ``kernel-grad=patches``): the patch-product kernel gradient in chunks of
  at most ``N`` output positions (`binax.nn.functional.PATCH_CHUNK_ROWS`);
- ``bytes=MIB``: chunks sized by the byte budget used before (``MIB`` MiB of float32 patches;
  the same as before for BinaryNet, whose convolutions keep their input's size).

Usage::

    python benchmarks/step_variants.py --width 0.25 --variants default int8-forward \\
        kernel-grad=patches lax-input-grad
    python benchmarks/step_variants.py --width 0.5 --variants kernel-grad=patches rows=4096
    python benchmarks/step_variants.py --model birealnet --variants default kernel-grad=patches
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def _settings(variant: str, F) -> dict:
    """The `binax.nn.functional` attributes to set while tracing ``variant``."""
    if variant == "default":
        return {}
    if variant == "lax-input-grad":
        return {"EIGEN_INPUT_GRADIENT": False}
    if variant == "int8-forward":
        return {"BINARY_POPCOUNT": False}
    kind, _, value = variant.partition("=")
    if kind == "kernel-grad":
        return {}  # a layer setting (`_layer_kwargs`)
    if kind == "rows":
        return {"PATCH_CHUNK_ROWS": int(value)}
    if kind == "bytes":
        budget = float(value) * 2**20

        def patch_product(x, w_dot, spec, _orig=F._patch_product):
            per_example = math.prod(w_dot.shape[:-1]) * math.prod(x.shape[1:-1]) * 4
            examples = max(1, int(budget // per_example))
            rows = examples * math.prod(x.shape[1:-1])
            saved, F.PATCH_CHUNK_ROWS = F.PATCH_CHUNK_ROWS, rows
            try:
                return _orig(x, w_dot, spec)
            finally:
                F.PATCH_CHUNK_ROWS = saved

        return {"_patch_product": patch_product}
    raise SystemExit(f"--variants: unknown variant {variant!r}")


def _layer_kwargs(variant: str) -> dict:
    """The layer settings of ``variant``: ``kernel_grad`` for ``kernel-grad=HOW``, and
    ``'patches'`` for the chunk-size variants (``rows=``, ``bytes=``)."""
    kind, _, value = variant.partition("=")
    if kind == "kernel-grad":
        return {"kernel_grad": value}
    return {"kernel_grad": "patches"} if kind in ("rows", "bytes") else {}


def _step(model: str, width: float, layer_kwargs: dict):
    """``step()``: one training step of the model, waiting until it is done (not compiled)."""
    if model == "binarynet":
        return _common.binarynet_step(width, **layer_kwargs)
    import vs_larq

    spec = dict(model="birealnet", input_shape=[32, 32, 3], batch=256, seed=0)
    run, _ = vs_larq.binax_program(dict(spec, threshold=1e-8, gamma=1e-4, lr=1e-2), layer_kwargs)
    return lambda: vs_larq.binax_step(run)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["binarynet", "birealnet"], default="binarynet")
    p.add_argument("--width", type=float, default=0.25, help="BinaryNet's width")
    p.add_argument("--variants", nargs="+", default=["default", "lax-input-grad"])
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args(argv)

    from binax.nn import functional as F

    steps = {}
    for variant in args.variants:
        settings = _settings(variant, F)
        saved = {name: getattr(F, name) for name in settings}
        for name, value in settings.items():
            setattr(F, name, value)
        try:
            steps[variant] = _step(args.model, args.width, _layer_kwargs(variant))
            for _ in range(3):  # compile (traced with the settings) and warm up
                steps[variant]()
        finally:
            for name, value in saved.items():
                setattr(F, name, value)
    wall = {v: [] for v in steps}
    cpu = {v: [] for v in steps}
    for _ in range(args.rounds):
        for variant, step in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            wall[variant].append(time.perf_counter() - t0)
            cpu[variant].append(time.process_time() - c0)

    print(f"Command: `{_common.command()}`\n{_common.machine()}\n")
    model = "Bi-Real Net 18 32x32x3"
    if args.model == "binarynet":
        model = f"BinaryNet x{args.width:g} 28x28x1"
    print(f"{model}, batch 256; medians of {args.rounds} rounds\n")
    base = _common.median_iqr(wall[args.variants[0]])[0]
    rows = []
    for variant in steps:
        w, lo, hi = _common.median_iqr(wall[variant])
        c = _common.median_iqr(cpu[variant])[0]
        rows.append([variant, f"{w:.3f} ({lo:.3f}-{hi:.3f})", f"{c:.3f}", f"{w / base:.2f}"])
    print(
        _common.md_table(("variant", "step s (IQR)", "CPU s", f"step / {args.variants[0]}'s"), rows)
    )


if __name__ == "__main__":
    main()
