"""Inference for trained binary networks: packed kernels, integer products, BN as thresholds.

>>> deployed = binax.deploy.compile(model)      # a trained NNX model of binax layers
>>> logits = deployed(images)                   # XOR+popcount / int8 products, thresholds
>>> deployed.save("model.bnx"); deployed = binax.deploy.load("model.bnx")

The ``binax-deploy RUN_DIR OUT`` command does the same for a ``binax-train`` run directory.
`binax.deploy.pallas.packed_dot` is the packed product as a Pallas kernel (for accelerators;
so far checked only in interpret mode on the CPU, and not used by `Deployed`).
"""

from binax.deploy.deployed import Deployed, DeployFileError, compile, from_bytes, load, to_bytes
from binax.deploy.lower import from_linen, lower_layer, register

__all__ = [
    "DeployFileError",
    "Deployed",
    "compile",
    "from_bytes",
    "from_linen",
    "load",
    "lower_layer",
    "register",
    "to_bytes",
]
