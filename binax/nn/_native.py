"""binax's CPU kernels (``_cpu_kernels.cc``), compiled on first use for the machine that runs them.

The C++ source is compiled with the system's ``g++`` (``-O3 -march=native``) against the XLA FFI
headers that ship with jaxlib (`jax.ffi.include_dir`), into a cache directory
(``$BINAX_CACHE_DIR``, else ``~/.cache/binax``, else the temporary directory), keyed by the
source, jaxlib's version, the compiler and the CPU; later processes load the cached library.
The custom calls are registered with XLA for the ``cpu`` platform only.

`available()` registers the custom calls (`KERNEL_GRAD`: a 2-d convolution's kernel
gradient; `BINARY_CONV`: a +-1 convolution by bits) and says whether they can be used: not
without a C++ compiler, after a failed build, on a platform other than Linux or macOS, or with
``BINAX_NATIVE=0`` in the environment. binax then computes the same values with XLA's own
operations (`binax.nn.functional`'s ``'patches'`` kernel gradient and int8 convolutions), after
one warning that says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

SOURCE = Path(__file__).with_name("_cpu_kernels.cc")
KERNEL_GRAD = "binax_conv_kernel_grad"
BINARY_CONV = "binax_binary_conv"
_SYMBOLS = {KERNEL_GRAD: "BinaxConvKernelGrad", BINARY_CONV: "BinaxBinaryConv"}
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC", "-w")
if platform.machine() in ("x86_64", "AMD64"):
    FLAGS += ("-mprefer-vector-width=512",)  # GCC's default is 256 bits even with AVX-512


def _cache_dir() -> Path:
    """Where the compiled library is kept: ``$BINAX_CACHE_DIR``, ``~/.cache/binax``, or a
    directory of the temporary one that only this user owns and can write (a fresh private
    one, not cached across processes, if another user could have planted a library there)."""
    for d in (os.environ.get("BINAX_CACHE_DIR"), Path.home() / ".cache" / "binax"):
        if d:
            try:
                Path(d).mkdir(parents=True, exist_ok=True)
                if os.access(d, os.W_OK):
                    return Path(d)
            except OSError:
                pass
    shared = Path(tempfile.gettempdir()) / f"binax-{os.getuid()}"
    try:
        shared.mkdir(mode=0o700, exist_ok=True)
        st = shared.lstat()
        if st.st_uid == os.getuid() and not st.st_mode & 0o022 and shared.is_dir():
            return shared
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="binax-"))


def _cpu() -> str:
    """The CPU's model and feature flags (what ``-march=native`` compiles for)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _build(compiler: str) -> Path:
    import jax
    import jaxlib

    include = jax.ffi.include_dir()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        "\0".join(
            [SOURCE.read_text(), jaxlib.__version__, include, version, _cpu(), " ".join(FLAGS)]
        ).encode()
    ).hexdigest()[:16]
    lib = _cache_dir() / f"binax_cpu_{key}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    # Compiled under a private name, then renamed: processes that build at once (pytest -n)
    # each load a whole library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    try:
        cmd = [compiler, *FLAGS, f"-I{include}", str(SOURCE), "-o", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@functools.cache
def available() -> bool:
    """Whether binax's CPU kernels are built, loaded and registered with XLA (see above)."""
    if os.environ.get("BINAX_NATIVE", "1") == "0":
        return False  # asked for: no warning
    if sys.platform not in ("linux", "darwin"):
        why = f"not built on {sys.platform}"
    elif (compiler := _compiler()) is None:
        why = "no C++ compiler (g++ or $CXX) was found"
    else:
        try:
            import jax

            lib = ctypes.cdll.LoadLibrary(str(_build(compiler)))
            for target, symbol in _SYMBOLS.items():
                capsule = jax.ffi.pycapsule(getattr(lib, symbol))
                jax.ffi.register_ffi_target(target, capsule, platform="cpu")
            return True
        except Exception as e:  # a failed build or load: fall back, say why
            why = f"{type(e).__name__}: {e}"
    warnings.warn(
        f"binax: the CPU kernels are not available ({why}); convolutions use XLA's slower "
        "paths (the same values). BINAX_NATIVE=0 silences this.",
        RuntimeWarning,
        stacklevel=2,
    )
    return False
