"""Approximate multipliers: the ``Multiplier`` pytree and its constructors.

Example:
  >>> from approx_jax import multipliers
  >>> m = multipliers.mbm(7)                 # minimally biased, 7 mantissa bits
  >>> m = multipliers.get("mitchell5")       # by name (as the CLI does)
  >>> m = multipliers.from_c("my_mul.c", "my_mul", 7)
  >>> designs = multipliers.stack([multipliers.mbm(7), multipliers.truncate(5)])
"""

from approx_jax._src.cmodel import CModelError
from approx_jax._src.multipliers import (
    EXACT_MBITS,
    Multiplier,
    exact,
    from_approxtrain,
    from_c,
    from_lut,
    from_python,
    get,
    mbm,
    mitchell,
    stack,
    to_approxtrain,
    truncate,
    unstack,
)

__all__ = [
    "CModelError",
    "EXACT_MBITS",
    "Multiplier",
    "exact",
    "from_approxtrain",
    "from_c",
    "from_lut",
    "from_python",
    "get",
    "mbm",
    "mitchell",
    "stack",
    "to_approxtrain",
    "truncate",
    "unstack",
]
