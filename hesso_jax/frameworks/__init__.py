"""Model surgery per framework: a smaller model object whose static sizes fit its shapes.

`hesso_jax.surgery` shrinks parameter trees; this package turns a shrunk tree back into a
model of the user's framework.
"""

from hesso_jax.frameworks.nnx import shrink_model

__all__ = ["shrink_model"]
