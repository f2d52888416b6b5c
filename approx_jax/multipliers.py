"""Approximate multipliers: the ``Multiplier`` pytree and its constructors.

Example:
  >>> from approx_jax import multipliers
  >>> m = multipliers.mbm(7)                 # minimally biased, 7 mantissa bits
  >>> m = multipliers.get("mitchell5")       # by name (as the CLI does)
  >>> m = multipliers.from_c("my_mul.c", "my_mul", 7)
  >>> designs = multipliers.stack([multipliers.mbm(7), multipliers.truncate(5)])
"""

from approx_jax._src.cmodel import CModelError
from approx_jax._src.multipliers import EXACT_MBITS
from approx_jax._src.multipliers import Multiplier
from approx_jax._src.multipliers import exact
from approx_jax._src.multipliers import from_approxtrain
from approx_jax._src.multipliers import from_c
from approx_jax._src.multipliers import from_lut
from approx_jax._src.multipliers import from_python
from approx_jax._src.multipliers import get
from approx_jax._src.multipliers import mbm
from approx_jax._src.multipliers import mitchell
from approx_jax._src.multipliers import stack
from approx_jax._src.multipliers import to_approxtrain
from approx_jax._src.multipliers import truncate
from approx_jax._src.multipliers import unstack

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
