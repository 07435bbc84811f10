"""ltr-jax: LLM serving in JAX with a learned-to-rank scheduler."""

__version__ = "0.1.0"
