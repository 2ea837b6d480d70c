"""Devices and hosts: the ``("data", "model")`` mesh, the shardings of batches, parameters and
optimizer state, the rows each process reads, and process 0 alone writing and printing."""

from __future__ import annotations

import os
import sys
from typing import Any

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

DATA, MODEL = "data", "model"


def make_mesh(num_devices: int | None = None, model_parallel: int = 1) -> Mesh:
    """A ``("data", "model")`` mesh over the first ``num_devices`` devices (all by default; in a
    multi-process run, those of every process). The axes are `AxisType.Auto`: shardings are
    given at the `jit` boundary and XLA propagates them through the model."""
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if not isinstance(n, int) or not 1 <= n <= len(devices):
        raise ValueError(f"num_devices must be in [1, {len(devices)}], got {num_devices!r}")
    if n != len(devices) and jax.process_count() > 1:
        raise ValueError("num_devices cannot be used in a multi-process run (it uses all devices)")
    if not isinstance(model_parallel, int) or model_parallel < 1 or n % model_parallel:
        raise ValueError(
            f"model_parallel must be a positive divisor of the number of devices ({n}), "
            f"got {model_parallel!r}"
        )
    shape = (n // model_parallel, model_parallel)
    return jax.make_mesh(shape, (DATA, MODEL), axis_types=(AxisType.Auto,) * 2, devices=devices[:n])


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """The `NamedSharding` of each parameter: its last axis split over ``"model"`` when it has
    two or more axes and ``"model"``'s size divides it, else replicated."""
    m = mesh.shape[MODEL]

    def one(x):
        shape = np.shape(x)
        split = m > 1 and len(shape) >= 2 and shape[-1] % m == 0
        return NamedSharding(mesh, P(*[None] * (len(shape) - 1), MODEL) if split else P())

    return jax.tree.map(one, tree)


def state_shardings(
    tx: optax.GradientTransformation, params: Any, param_shardings: Any, mesh: Mesh
) -> Any:
    """The sharding of each leaf of ``tx``'s state: that of its parameter where
    `optax.tree.map_params` finds a copy of the parameter tree (e.g. Bop's EMA inside
    `binax.partition`) and the shapes agree; other leaves (step counts, scalars) replicated."""
    replicated = NamedSharding(mesh, P())

    def pick(leaf, sharding, param):
        if isinstance(leaf, optax.MaskedNode):
            return leaf
        return sharding if np.shape(leaf) == np.shape(param) else replicated

    return optax.tree.map_params(
        tx,
        pick,
        jax.eval_shape(tx.init, params),
        param_shardings,
        params,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode),
    )


def process_rows(sharding: NamedSharding, global_rows: int) -> tuple[int, int]:
    """``(index, count)``: this process supplies block ``index`` of ``count`` equal blocks of a
    global batch (`binax.data.batches`' ``process_index`` and ``process_count``), read off the
    sharding: right whatever the order of the mesh's devices, and processes that hold the same
    rows (a ``"model"`` axis across hosts) get the same block."""
    index_map = sharding.addressable_devices_indices_map((global_rows,))
    spans = {(s[0].start or 0, s[0].stop or global_rows) for s in index_map.values()}
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    rows = hi - lo
    if sum(b - a for a, b in spans) != rows or global_rows % rows:
        raise ValueError(
            "this process's devices do not hold one contiguous block of the batch; use a "
            "mesh from binax.train.make_mesh"
        )
    return lo // rows, global_rows // rows


def is_main() -> bool:
    """True in process 0, the one that prints and writes the log, config and plots."""
    return jax.process_index() == 0


def say(text: str) -> None:
    """Prints ``text`` on process 0 (through tqdm, so that an open progress bar stays intact)."""
    if is_main():
        tqdm.write(text, file=sys.stdout)


def sync(name: str) -> None:
    """A barrier over all processes (nothing to do in a single-process run)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: int = 300,
) -> None:
    """Calls `jax.distributed.initialize` (before anything else touches the devices), after
    which `make_mesh` spans the devices of every process. Arguments left ``None`` come from
    ``$JAX_COORDINATOR_ADDRESS`` (process 0's ``host:port``), ``$JAX_NUM_PROCESSES`` and
    ``$JAX_PROCESS_ID``; without all three JAX detects the cluster (Cloud TPU pod slices,
    SLURM, Open MPI, Kubernetes). ``timeout_s``: seconds to wait for every process to connect."""

    def env(value: int | None, name: str) -> int | None:
        text = os.environ.get(name)
        if value is not None or not text:
            return value
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"${name} must be an integer, got {text!r}") from None

    count, index = env(num_processes, "JAX_NUM_PROCESSES"), env(process_id, "JAX_PROCESS_ID")
    # JAX checks the ranges, and reads $JAX_COORDINATOR_ADDRESS itself.
    jax.distributed.initialize(coordinator_address, count, index, initialization_timeout=timeout_s)
