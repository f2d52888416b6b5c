"""Error metrics of a multiplier (SPEC section 6).

Products are computed with the NumPy reference (:mod:`reference`), so the
metrics describe exactly the arithmetic every kernel implements.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import warnings

import numpy as np

from approx_jax._src import multipliers as multipliers_lib
from approx_jax._src import reference


@dataclasses.dataclass(frozen=True, eq=False)
class ErrorMetrics:
    """SPEC section 6 metrics of one design.

    Relative errors are ``(O' - O) / |O|`` with ``O`` the exact float64 product
    and ``O'`` the simulated one.

    Attributes:
      name: Design name.
      mbits: Mantissa width M (23 for the exact multiplier).
      mode: ``"uniform"`` (every mantissa pair) or ``"samples"``.
      count: Number of operand pairs the metrics average over.
      bias: Mean relative error, ``mean((O' - O) / |O|)`` (SPEC section 6;
        signed by the product, so on operands of mixed sign a design's
        magnitude error cancels: see ``magnitude_bias``).
      mred: Mean relative error distance, ``mean(|O' - O| / |O|)``.
      worst_case: Maximum relative error distance.
      rms: Root mean square of the relative error.
      error_probability: Fraction of pairs with ``O' != O``.
      heatmap: ``[2**M, 2**M]`` mean relative error per mantissa pair
        ``(i, j)`` (``i`` = first operand's truncated mantissa; NaN where a
        sample set has no pair), or ``None`` for the exact multiplier. For
        samples it is the error of the magnitude, ``(|O'| - |O|) / |O|``
        (a cell is a pair of mantissas, whatever the signs).
      skipped: Sample pairs left out because the exact product was zero, not
        finite or beyond float32's range. (A simulated product that
        overflows where the exact one fits float32 is kept: its relative
        error, and so ``worst_case`` and ``mred``, is infinite.)
      magnitude_bias: Mean relative error of the magnitude,
        ``mean((|O'| - |O|) / |O|)``: whether the design over- or
        underestimates products whatever their sign (equal to ``bias`` over
        all mantissa pairs, whose operands are positive).

    The metrics can also be read by key or attribute, under their field names
    or the usual abbreviations (case-insensitive): ``metrics["mred"]``,
    ``metrics["MRED"]``, ``metrics.MRED``,
    ``metrics["WCRE"]`` (``worst_case``), ``metrics["EP"]``
    (``error_probability``), ``metrics["mean_relative_error"]`` (``bias``),
    ``metrics["RMSRE"]`` (``rms``); ``dict(metrics)`` gives every field.
    """

    name: str
    mbits: int
    mode: str
    count: int
    bias: float
    mred: float
    worst_case: float
    rms: float
    error_probability: float
    heatmap: np.ndarray | None
    skipped: int = 0
    magnitude_bias: float = float("nan")

    def keys(self) -> list[str]:
        """Field names, as a mapping's keys (``dict(metrics)`` works).

        Returns:
          The dataclass field names, heat map included.
        """
        return [field.name for field in dataclasses.fields(self)]

    def __getitem__(self, key: str):
        if not isinstance(key, str):
            raise TypeError(f"ErrorMetrics keys are metric names (str), got {type(key).__name__}")
        field = _METRIC_ALIASES.get(_normalise_key(key))
        if field is None:
            aliases = sorted(a for a in _METRIC_ALIASES if a not in self.keys())
            raise KeyError(
                f"{key!r} is not a metric; known: {', '.join(self.keys())} "
                f"(aliases: {', '.join(aliases)})"
            )
        return getattr(self, field)

    def __getattr__(self, name: str):
        # Only reached for names that are not fields: lets ``metrics.MRED`` or
        # ``metrics.wcre`` read a metric by alias, as ``metrics["MRED"]`` does.
        if name.startswith("_"):
            raise AttributeError(name)
        field = _METRIC_ALIASES.get(_normalise_key(name))
        if field is None:
            raise AttributeError(
                f"'ErrorMetrics' has no attribute {name!r}; metrics: {', '.join(self.keys())}"
            )
        return getattr(self, field)

    def __contains__(self, key) -> bool:
        return isinstance(key, str) and _normalise_key(key) in _METRIC_ALIASES

    def get(self, key: str, default=None):
        """Metric ``key`` (as for ``metrics[key]``), or ``default`` if unknown.

        Args:
          key: A field name or alias.
          default: Returned when ``key`` is not a metric.

        Returns:
          The metric's value or ``default``.
        """
        return self[key] if key in self else default

    def as_dict(self) -> dict:
        """Scalar metrics as a dict (no heat map).

        Returns:
          ``{"name", "mbits", "mode", "count", "bias", "mred", "worst_case",
          "rms", "error_probability", "skipped", "magnitude_bias"}``.
        """
        return {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)
            if field.name != "heatmap"
        }


def _normalise_key(key: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", key.strip().lower()).strip("_")


# Every field under its own name, plus the abbreviations of the approximate
# computing literature (MRED, WCRE / WCE, EP / ER, RMSRE) and spelled-out
# names; SPEC section 6 calls the signed mean the mean relative error.
_METRIC_ALIASES = {
    **{field.name: field.name for field in dataclasses.fields(ErrorMetrics)},
    "mean_relative_error": "bias",
    "mean_error": "bias",
    "mean_relative_error_distance": "mred",
    "mean_relative_error_magnitude": "mred",
    "mean_absolute_relative_error": "mred",
    "worst_case_relative_error": "worst_case",
    "max_relative_error": "worst_case",
    "maximum_relative_error": "worst_case",
    "wcre": "worst_case",
    "wce": "worst_case",
    "rms_relative_error": "rms",
    "root_mean_square_relative_error": "rms",
    "rmsre": "rms",
    "rmsred": "rms",
    "ep": "error_probability",
    "er": "error_probability",
    "error_rate": "error_probability",
    "heat_map": "heatmap",
}


def _magnitude_error(simulated, exact_values):
    """``(|O'| - |O|) / |O|``: the relative error of the product's magnitude.

    Where operand signs are mixed, SPEC's signed relative error averages a
    design's magnitude error with both signs and cancels (Mitchell's -3.9 %
    reads about 0 on normal-distributed operands); this form keeps it.
    """
    return (np.abs(simulated) - np.abs(exact_values)) / np.abs(exact_values)


def _metrics(name, mbits, mode, simulated, exact_values, heatmap, skipped) -> ErrorMetrics:
    relative = (simulated - exact_values) / np.abs(exact_values)
    distance = np.abs(relative)
    magnitude = _magnitude_error(simulated, exact_values)
    empty = relative.size == 0
    return ErrorMetrics(
        name=name,
        mbits=mbits,
        mode=mode,
        count=int(relative.size),
        bias=float("nan") if empty else float(relative.mean()),
        mred=float("nan") if empty else float(distance.mean()),
        worst_case=float("nan") if empty else float(distance.max()),
        rms=float("nan") if empty else float(np.sqrt(np.mean(relative**2))),
        error_probability=float("nan") if empty else float(np.mean(simulated != exact_values)),
        heatmap=heatmap,
        skipped=int(skipped),
        magnitude_bias=float("nan") if empty else float(magnitude.mean()),
    )


def _unpack_samples(samples):
    """Splits ``samples`` into its operand arrays ``(a, b)``.

    Returns:
      ``(a, b)`` as float32 NumPy arrays, broadcast against each other and
      flattened.

    Raises:
      ValueError: If ``samples`` is not a pair, or the shapes do not broadcast.
      TypeError: If an operand is complex or not numeric.
    """
    # A tuple or list of two is the pair (a, b); any other list is read as an
    # array. An array of shape [N, 2] holds one pair per row, also when N = 2
    # (as documented; only a [2, N] array with N != 2 is read as rows a, b).
    if isinstance(samples, dict | set | str | bytes):
        raise TypeError(
            "samples must be a pair (a, b) of operand arrays or an [N, 2] array, got "
            f"{type(samples).__name__}"
        )
    if isinstance(samples, list) and len(samples) != 2:
        try:
            samples = np.asarray(samples)
        except ValueError as err:  # ragged rows
            raise ValueError(
                f"samples is a list of {len(samples)} items, not of (a, b) pairs: {err}"
            ) from err
    if hasattr(samples, "shape") and len(samples.shape) == 2 and samples.shape[1] == 2:
        samples = (samples[:, 0], samples[:, 1])
    try:
        a, b = samples
    except (TypeError, ValueError) as err:
        # Without this, (a,) fails with Python's bare unpacking message.
        raise ValueError(
            "samples must be a pair (a, b) of operand arrays or an [N, 2] array, got "
            + (
                f"an array of shape {tuple(samples.shape)}"
                if hasattr(samples, "shape")
                else f"{type(samples).__name__} of length {_length(samples)}"
            )
        ) from err
    arrays = []
    for label, x in (("a", a), ("b", b)):
        x = np.asarray(x)
        if x.dtype.kind == "c":
            raise TypeError(f"samples operand {label} is complex ({x.dtype}): products are real")
        # Kind "V" includes ml_dtypes' bfloat16 / float8 (from jax arrays).
        if x.dtype.kind not in "biufV":
            raise TypeError(f"samples operand {label} is not numeric ({x.dtype})")
        try:
            arrays.append(x.astype(np.float32))
        except (TypeError, ValueError) as err:
            raise TypeError(f"samples operand {label} is not numeric ({x.dtype})") from err
    try:
        a32, b32 = np.broadcast_arrays(*arrays)
    except ValueError as err:
        raise ValueError(
            f"samples operands do not broadcast: shapes {arrays[0].shape} and {arrays[1].shape}"
        ) from err
    if a32.size == 0:
        raise ValueError(
            f"samples hold no operand pairs (shapes {arrays[0].shape} and {arrays[1].shape})"
        )
    return a32.reshape(-1), b32.reshape(-1)


def _length(obj) -> str:
    try:
        return str(len(obj))
    except TypeError:
        return "unknown"


def _flush_subnormals(x: np.ndarray) -> np.ndarray:
    """Float32 ``x`` with subnormal values replaced by zeros of the same sign."""
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        tiny = np.abs(x) < np.finfo(np.float32).tiny
        return np.where(tiny, np.copysign(np.float32(0), x), x).astype(np.float32)


def _characterize_one(multiplier, samples) -> ErrorMetrics:
    M = multiplier.mbits
    name = str(multiplier.name)
    if samples is None:
        if multiplier.is_exact:
            # Products of mantissas with <= 11 bits are exact in float32.
            return ErrorMetrics(
                name, M, "uniform", 0, 0.0, 0.0, 0.0, 0.0, 0.0, None, magnitude_bias=0.0
            )
        a, b = reference.mantissa_grid(M)
        exact_values = a.astype(np.float64) * b.astype(np.float64)
        simulated = reference.product(a, b, multiplier.lut, M).astype(np.float64)
        result = _metrics(name, M, "uniform", simulated, exact_values, None, 0)
        heatmap = ((simulated - exact_values) / exact_values).reshape(1 << M, 1 << M)
        return dataclasses.replace(result, heatmap=heatmap)

    # The multiplier sees float32 operands (SPEC section 1); O is their exact
    # product (float64 holds a 24x24-bit product exactly).
    a32, b32 = _unpack_samples(samples)
    exact_values = a32.astype(np.float64) * b32.astype(np.float64)
    if multiplier.is_exact:
        # The native float32 product as the ops compute it: XLA flushes
        # subnormal operands and results to zero (SPEC section 2, step 2).
        simulated = _flush_subnormals(_flush_subnormals(a32) * _flush_subnormals(b32)).astype(
            np.float64
        )
    else:
        simulated = reference.product(a32, b32, multiplier.lut, M).astype(np.float64)
    # Which pairs count depends on the exact product alone, so every design
    # of a comparison is measured on the same pairs. A pair whose exact
    # product lies outside float32's range is skipped (a float32 multiplier
    # cannot represent it either); one whose simulated product overflows
    # while the exact one fits float32 (a carry into the top exponent) is the
    # design's error, kept with an infinite relative error, as SPEC section 6
    # names no exclusions.
    with np.errstate(over="ignore"):
        fits_float32 = np.isfinite(exact_values.astype(np.float32))
    keep = np.isfinite(exact_values) & (exact_values != 0) & fits_float32
    if not keep.any():
        warnings.warn(
            f"{name}: none of the {keep.size} sample pairs has a nonzero exact product "
            "within float32's range (zeros, Inf, NaN or out-of-range products are "
            "skipped): every sample metric is NaN",
            RuntimeWarning,
            stacklevel=3,
        )
    simulated_kept, exact_kept = simulated[keep], exact_values[keep]
    heatmap = None
    if not multiplier.is_exact:
        shift = 23 - M
        ia = (a32.view(np.uint32)[keep] & 0x7FFFFF) >> shift
        ib = (b32.view(np.uint32)[keep] & 0x7FFFFF) >> shift
        cell = (ia.astype(np.int64) << M) | ib
        magnitude = _magnitude_error(simulated_kept, exact_kept)
        sums = np.bincount(cell, weights=magnitude, minlength=1 << (2 * M))
        counts = np.bincount(cell, minlength=1 << (2 * M))
        with np.errstate(invalid="ignore", divide="ignore"):
            heatmap = (sums / counts).reshape(1 << M, 1 << M)
    return _metrics(
        name, M, "samples", simulated_kept, exact_kept, heatmap, np.count_nonzero(~keep)
    )


def characterize(multiplier, samples=None):
    """Computes SPEC section 6 error metrics.

    Args:
      multiplier: A Multiplier (or a name accepted by ``get``); a stack gives
        one result per design.
      samples: ``None`` for every mantissa pair (operands ``1 + i/2^M``,
        ``1 + j/2^M``, compared with their exact product), or operand
        pairs: ``(a, b)``, a tuple or list of two arrays that broadcast
        against each other, or one ``[N, 2]`` array with a pair per row
        (also for ``N = 2``; a list of ``N != 2`` pairs is read the same
        way). They are cast to float32 and compared with the exact float64
        product of those float32 values; pairs whose exact product is zero,
        not finite or beyond float32's range are skipped and counted in
        ``skipped`` (a rule on the exact product alone, so every design is
        measured on the same pairs). A pair the design overflows to infinity
        although its exact product fits float32 counts with an infinite
        relative error (so ``worst_case`` and ``mred`` are ``inf``).

    Returns:
      An :class:`ErrorMetrics`, or a list of them for a stack.

    Raises:
      ValueError: If ``samples`` is neither ``None`` nor a pair ``(a, b)`` of
        arrays that broadcast against each other (nor an ``[N, 2]`` array).
      TypeError: If ``samples`` is a mapping, set or string, or a sample
        operand is complex or not numeric.
    """
    multiplier = multipliers_lib.get(multiplier)
    if samples is not None:
        # Checked up front so a stack fails before characterising any design.
        _unpack_samples(samples)
    if multiplier.is_stack:
        return [_characterize_one(m, samples) for m in multipliers_lib.unstack(multiplier)]
    return _characterize_one(multiplier, samples)


def characterize_table(multipliers, samples=None) -> list[dict]:
    """Metrics of several designs as table rows.

    Args:
      multipliers: Iterable of Multipliers or names (stacks are expanded).
      samples: As for :func:`characterize`.

    Returns:
      List of :meth:`ErrorMetrics.as_dict` rows, one per design.

    Raises:
      TypeError: If ``multipliers`` is a single name, path or Multiplier
        rather than an iterable of them.
    """
    multipliers_lib.check_design_sequence(
        multipliers, "multipliers must be an iterable of Multipliers or names"
    )
    rows = []
    for m in multipliers:
        result = characterize(m, samples)
        for r in result if isinstance(result, list) else [result]:
            rows.append(r.as_dict())
    return rows


def plot_heatmaps(results, path, *, columns: int = 4) -> pathlib.Path:
    """Writes the relative-error heat maps of several designs to a PNG.

    Args:
      results: An :class:`ErrorMetrics` or a list of them (designs without a
        heat map, i.e. exact, are skipped).
      path: Output file (``.png``).
      columns: Maximum subplots per row (a positive int).

    Returns:
      The path written.

    Raises:
      TypeError: If ``results`` are not ``ErrorMetrics`` or ``path`` is not a
        path.
      ValueError: If no result has a heat map, or ``columns`` is not a
        positive int.
    """
    if isinstance(columns, bool) or not isinstance(columns, int | np.integer) or columns < 1:
        raise ValueError(f"columns must be a positive int, got {columns!r}")
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if isinstance(results, ErrorMetrics):
        results = [results]
    if not isinstance(results, list | tuple) or not all(
        isinstance(r, ErrorMetrics) for r in results
    ):
        raise TypeError(
            "results must be ErrorMetrics from approx_jax.characterize (or a list of them), "
            f"got {type(results).__name__}"
        )
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a file path, got {type(path).__name__}")
    results = [r for r in results if r.heatmap is not None]
    if not results:
        raise ValueError("no heat maps to plot (the exact multiplier has none)")
    cols = min(columns, len(results))
    rows = -(-len(results) // cols)
    path = pathlib.Path(path)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False)
    try:  # no figure left open when drawing or saving fails (a missing folder)
        for ax in axes.flat[len(results) :]:
            ax.axis("off")
        for ax, result in zip(axes.flat, results, strict=False):
            finite = np.abs(result.heatmap[np.isfinite(result.heatmap)])
            limit = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
            image = ax.imshow(
                result.heatmap,
                cmap="RdBu_r",
                vmin=-limit,
                vmax=limit,
                origin="lower",
                extent=(0, 1, 0, 1),
            )
            ax.set_title(f"{result.name} (M={result.mbits})\nMRED {result.mred:.3g}", fontsize=9)
            ax.set_xlabel("b mantissa (j / 2^M)")
            ax.set_ylabel("a mantissa (i / 2^M)")
            label = "relative error of |O|" if result.mode == "samples" else "relative error"
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=label)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path
