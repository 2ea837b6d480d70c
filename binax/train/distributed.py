"""Starting JAX's distributed runtime for multi-process (multi-host) training."""

from __future__ import annotations

import os

import jax

#: Environment variables read when the arguments are not given (JAX itself reads
#: ``JAX_COORDINATOR_ADDRESS``; the other two are binax's, for symmetry).
ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = (
    "JAX_COORDINATOR_ADDRESS",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"${name} must be an integer, got {value!r}") from None


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: int = 300,
) -> None:
    """Calls `jax.distributed.initialize` (before anything else touches the devices).

    Every process runs the same program with its own ``process_id``; afterwards
    ``jax.devices()`` lists the devices of all processes and `binax.train.make_mesh` spans
    them. Arguments left ``None`` are read from ``$JAX_COORDINATOR_ADDRESS``,
    ``$JAX_NUM_PROCESSES`` and ``$JAX_PROCESS_ID``; when all three are still missing JAX
    detects the cluster itself (Cloud TPU VMs and pod slices, SLURM, Open MPI, Kubernetes).

    On CPU the collectives go through Gloo (``jax_cpu_collectives_implementation``, already
    the default in JAX 0.10), so several CPU processes on one machine can train together, as
    the tests do.

    Args:
      coordinator_address: ``host:port`` of process 0, reachable from every process.
      num_processes: the number of processes.
      process_id: this process's index in ``[0, num_processes)``.
      timeout_s: seconds to wait for all processes to connect.
    """
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    if num_processes is None:
        num_processes = _env_int(ENV_NUM_PROCESSES)
    if process_id is None:
        process_id = _env_int(ENV_PROCESS_ID)
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if (
        process_id is not None
        and num_processes is not None
        and not (0 <= process_id < num_processes)
    ):
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=timeout_s,
    )
