"""Test setup: 8 simulated CPU devices (must happen before JAX starts its backend), and one
persistent compilation cache, also for the commands the tests start: the many small training
runs compile the same steps again and again (a hit skips XLA's compilation, nothing else)."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "binax-tests-jax-cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
