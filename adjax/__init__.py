"""adjax: JAX/Flax industrial visual anomaly detection."""

__version__ = "0.1.0"
