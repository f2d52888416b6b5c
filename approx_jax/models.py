"""Reference models with a functional ``init`` / ``apply`` interface.

Example:
  >>> import approx_jax.models as models
  >>> model = models.create("lenet5")
  >>> params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  >>> logits = model.apply(params, x, "mbm7")
"""

from approx_jax._src.models import (
    KINDS,
    Model,
    create,
    load_params,
    names,
    resolve_kinds,
    save_params,
)

__all__ = ["KINDS", "Model", "create", "load_params", "names", "resolve_kinds", "save_params"]
