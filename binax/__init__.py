"""binax: binary neural network optimizers as pure Optax transforms."""

__version__ = "0.1.0"
