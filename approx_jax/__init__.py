"""approx_jax: bit-exact simulation of approximate hardware multipliers in JAX.

Every product inside the simulated ops follows SPEC section 2 (truncated
mantissas index a LUT of result mantissa and carry); sums are float32.

The ops may be called from several threads. Import approx_jax (or any of
its modules) once before starting them: Python lets a thread import a
submodule of a package that another thread is still initialising, and such
imports can fail.

Example:
  >>> import approx_jax
  >>> from approx_jax import multipliers
  >>> y = approx_jax.approx_dot(x, w, multipliers.mbm(7))
"""

from approx_jax import data, models, multipliers, nn, parallel
from approx_jax._src.characterize import (
    ErrorMetrics,
    characterize,
    characterize_table,
    plot_heatmaps,
)
from approx_jax._src.conv import approx_conv
from approx_jax._src.ffi import export_disabled_checks, registered_platforms
from approx_jax._src.host import tune_cpu_allocator
from approx_jax._src.multipliers import Multiplier
from approx_jax._src.ops import approx_dot, approx_matmul, multiply
from approx_jax._src.transform import approximate, einsum, operand_samples, ragged_dot

__version__ = "0.1.0"

__all__ = [
    "ErrorMetrics",
    "Multiplier",
    "approx_conv",
    "approx_dot",
    "approx_matmul",
    "approximate",
    "characterize",
    "characterize_table",
    "data",
    "einsum",
    "export_disabled_checks",
    "models",
    "multipliers",
    "multiply",
    "nn",
    "operand_samples",
    "parallel",
    "plot_heatmaps",
    "ragged_dot",
    "registered_platforms",
    "tune_cpu_allocator",
]
