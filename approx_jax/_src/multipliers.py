"""The :class:`Multiplier` pytree and its constructors.

A multiplier of width M is a lookup table of ``4**M`` entries (stored format,
see :mod:`approx_jax._src.lut`) plus static metadata. The LUT is the pytree's
only leaf, so a Multiplier can be passed straight into ``jax.jit``/``vmap``;
two designs of the same width share one compiled program (the name and
metadata do not take part in the jit cache key, see :class:`_Label`).

Built-in families (SPEC section 4) are built from the C functional models in
``multipliers/*.c`` through :func:`from_c`, the same path users follow.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from approx_jax._src import cmodel, reference
from approx_jax._src import lut as lut_lib

# Width reported by the exact (native float32) multiplier: it sees every one of
# float32's 23 mantissa bits. It is never used to index a LUT (exact has none).
EXACT_MBITS = 23

_BUILTIN_FAMILIES = {
    # family: (C file, C function, NumPy fallback)
    "truncate": ("truncate.c", "truncate_mul", reference.truncate_lut),
    "mitchell": ("mitchell.c", "mitchell_mul", reference.mitchell_lut),
    "mbm": ("mbm.c", "mbm_mul", reference.mbm_lut),
}
_FAMILY_ALIASES = {
    "truncate": "truncate",
    "trunc": "truncate",
    "acc": "truncate",
    "mitchell": "mitchell",
    "mit": "mitchell",
    "mbm": "mbm",
}
_EXACT_NAMES = ("fp32", "exact", "float32", "native")


def _freeze(value):
    """Makes metadata values hashable (dicts -> sorted pairs, lists -> tuples)."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, set | frozenset):
        return tuple(sorted(_freeze(v) for v in value))
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    hash(value)  # raises TypeError for anything else unhashable
    return value


def _freeze_metadata(metadata) -> tuple:
    if metadata is None:
        return ()
    if isinstance(metadata, Mapping):
        return _freeze(metadata)
    return tuple((str(k), _freeze(v)) for k, v in metadata)


class _Label:
    """Name and metadata carried in the pytree aux data without keying jit caches.

    Every ``_Label`` compares equal to every other, so ``jax.jit`` reuses one
    compiled program for all designs of the same width: a design sweep costs
    one compilation, not one per design. The consequence is that code traced
    under jit must not branch on a Multiplier's name (the kernels use only
    ``mbits`` and the LUT, which is all that defines the arithmetic), and a
    Multiplier *returned* from a cached jitted function carries the name of the
    design it was first traced with.
    """

    __slots__ = ("name", "metadata")

    def __init__(self, name, metadata):
        self.name = name
        self.metadata = metadata

    def __eq__(self, other):
        return isinstance(other, _Label)

    def __hash__(self):
        return hash(_Label)

    def __repr__(self):
        return f"_Label({self.name!r})"


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Multiplier:
    """An approximate float32 multiplier defined by a LUT (SPEC section 2).

    Attributes:
      lut: Stored-format LUT (NumPy or JAX array of ``uint8``/``uint16``),
        shape ``[4**mbits]``, or ``[D, 4**mbits]`` for a stack of ``D``
        designs; ``None`` for the exact multiplier. The only pytree leaf.
      name: Design name; a tuple of names for a stack.
      mbits: Mantissa width M (1..11); ``EXACT_MBITS`` (23) for ``exact()``.
      metadata: Hashable tuple of ``(key, value)`` pairs (provenance etc.).
    """

    lut: Any
    name: Any = "custom"
    mbits: int = EXACT_MBITS
    metadata: tuple = ()

    def __post_init__(self):
        if self.lut is None:
            if self.mbits != EXACT_MBITS:
                raise ValueError(
                    f"a Multiplier without a LUT is exact and has mbits={EXACT_MBITS}, "
                    f"got mbits={self.mbits}"
                )
        else:
            lut_lib.check_mbits(self.mbits, arg_name="mbits")
        object.__setattr__(self, "metadata", _freeze_metadata(self.metadata))
        if isinstance(self.name, list):
            object.__setattr__(self, "name", tuple(self.name))

    # -- pytree protocol ----------------------------------------------------
    def tree_flatten(self):
        """Returns ``((lut,), aux)``; see :class:`_Label` for the aux data."""
        return (self.lut,), (self.mbits, _Label(self.name, self.metadata))

    @classmethod
    def tree_unflatten(cls, aux, children):
        """Rebuilds a Multiplier without validation (leaves may be tracers)."""
        mbits, label = aux
        obj = object.__new__(cls)
        object.__setattr__(obj, "lut", children[0])
        object.__setattr__(obj, "name", label.name)
        object.__setattr__(obj, "mbits", mbits)
        object.__setattr__(obj, "metadata", label.metadata)
        return obj

    # -- properties ------------------------------------------------------------
    @property
    def is_exact(self) -> bool:
        """Whether this is the native float32 multiplier (no LUT)."""
        return self.lut is None

    @property
    def is_stack(self) -> bool:
        """Whether the LUT holds several designs (shape ``[D, 4**M]``)."""
        return self.lut is not None and np.ndim(self.lut) == 2

    @property
    def num_designs(self) -> int:
        """Number of designs: ``D`` for a stack, else 1."""
        return int(np.shape(self.lut)[0]) if self.is_stack else 1

    @property
    def names(self) -> tuple[str, ...]:
        """Design names as a tuple (one entry unless this is a stack)."""
        return tuple(self.name) if isinstance(self.name, tuple) else (self.name,)

    @property
    def info(self) -> dict:
        """Metadata as a dict."""
        return dict(self.metadata)

    def kernel_lut(self):
        """Kernel-format LUT, ``uint32[..., 4**M]`` (see :func:`lut.kernel_lut`).

        Returns:
          The converted LUT (a JAX array; works under jit).

        Raises:
          ValueError: For the exact multiplier, which has no LUT.
        """
        if self.is_exact:
            raise ValueError("the exact multiplier has no LUT")
        return lut_lib.kernel_lut(self.lut, self.mbits)

    def __repr__(self):
        if self.is_exact:
            return "Multiplier(fp32, exact)"
        if self.is_stack:
            shown = ", ".join(self.names[:4]) + (", ..." if len(self.names) > 4 else "")
            return f"Multiplier(stack of {self.num_designs}: [{shown}], M={self.mbits})"
        return f"Multiplier({self.name}, M={self.mbits})"


# ---------------------------------------------------------------------------
# Constructors
# ---------------------------------------------------------------------------


def exact() -> Multiplier:
    """The exact (native float32) multiplier.

    Ops dispatch to the native XLA op when ``multiplier.is_exact``.

    Returns:
      ``Multiplier(lut=None, name="fp32", mbits=EXACT_MBITS)``.
    """
    return _EXACT


_EXACT = Multiplier(None, "fp32", EXACT_MBITS, (("family", "exact"),))


def _readonly(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    array.setflags(write=False)
    return array


@functools.cache
def _builtin_lut(family: str, M: int) -> np.ndarray:
    """Builds (and caches) a built-in family's LUT via its C model."""
    file_name, function, numpy_fallback = _BUILTIN_FAMILIES[family]
    if cmodel.find_compiler() is None:
        warnings.warn(
            f"no C compiler found: building the built-in {family}({M}) LUT with the "
            "NumPy reference implementation instead of multipliers/" + file_name,
            RuntimeWarning,
            stacklevel=3,
        )
        return _readonly(numpy_fallback(M))
    path = cmodel.builtin_model_path(file_name)
    return _readonly(cmodel.build_lut(path, function, M))


def _builtin(family: str, M) -> Multiplier:
    M = lut_lib.check_mbits(M)
    metadata = (("family", family), ("source", "builtin"))
    return Multiplier(_builtin_lut(family, M), f"{family}{M}", M, metadata)


def truncate(M: int) -> Multiplier:
    """Exact multiplication of operands truncated to M bits, result truncated (SPEC 4).

    ``truncate(7)`` is bfloat16-style multiplication (ApproxTrain's ``ACC_7``).

    Args:
      M: Mantissa width, 1..11.

    Returns:
      Multiplier named ``f"truncate{M}"``.

    Raises:
      ValueError: If ``M`` is not an int in 1..11.
    """
    return _builtin("truncate", M)


def mitchell(M: int) -> Multiplier:
    """Mitchell's logarithmic multiplier of width M (SPEC section 4).

    Args:
      M: Mantissa width, 1..11.

    Returns:
      Multiplier named ``f"mitchell{M}"``.

    Raises:
      ValueError: If ``M`` is not an int in 1..11.
    """
    return _builtin("mitchell", M)


def mbm(M: int) -> Multiplier:
    """Minimally biased multiplier of width M (Saadat et al.; SPEC section 4).

    Args:
      M: Mantissa width, 1..11.

    Returns:
      Multiplier named ``f"mbm{M}"``.

    Raises:
      ValueError: If ``M`` is not an int in 1..11.
    """
    return _builtin("mbm", M)


def _infer_mbits(size: int, what: str) -> int:
    for M in range(lut_lib.MIN_MBITS, lut_lib.MAX_MBITS + 1):
        if lut_lib.num_entries(M) == size:
            return M
    valid = ", ".join(str(lut_lib.num_entries(M)) for M in range(1, 12))
    raise ValueError(
        f"{what} has {size} entries, which is not 4**M for any M in 1..11 "
        f"(expected 4**M entries: one of {valid})"
    )


def from_lut(array, M: int | None = None, name: str | Sequence[str] = "custom", metadata=()):
    """Wraps a LUT given as stored-format integers or as product values.

    Args:
      array: Either a stored-format integer array, shape ``[4**M]`` or
        ``[D, 4**M]`` (a stack), or a float array of ``4**M`` products ``p`` in
        ``[1, 4)`` for each ``(i, j)`` (any shape, ``i``-major, e.g.
        ``[2**M, 2**M]``), encoded by SPEC section 3.
      M: Mantissa width; inferred from the number of entries if ``None``.
      name: Design name (for a stack, a name or one name per design).
      metadata: Extra ``(key, value)`` pairs or a dict.

    Returns:
      A Multiplier holding a NumPy LUT.

    Raises:
      TypeError: If the dtype is neither integer nor floating.
      ValueError: If the size does not match ``4**M`` or entries are out of range.
    """
    arr = np.asarray(array)
    if np.issubdtype(arr.dtype, np.floating):
        if M is None:
            M = _infer_mbits(arr.size, "product array")
        M = lut_lib.check_mbits(M)
        if arr.size != lut_lib.num_entries(M):
            raise ValueError(
                f"product array has {arr.size} entries; expected 4**M = "
                f"{lut_lib.num_entries(M)} entries for M={M}"
            )
        stored = lut_lib.encode_products(arr, M, what="product array")
    else:
        if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(
                f"from_lut expects integer (stored-format) or float (product) entries, "
                f"got dtype {arr.dtype}"
            )
        if M is None:
            M = _infer_mbits(arr.shape[-1] if arr.ndim else 0, "LUT")
        stored = lut_lib.validate_lut(arr, lut_lib.check_mbits(M))
    if stored.ndim == 2:
        if isinstance(name, str):
            name = tuple(f"{name}[{d}]" for d in range(stored.shape[0]))
        name = tuple(name)
        if len(name) != stored.shape[0]:
            raise ValueError(f"got {len(name)} names for a stack of {stored.shape[0]} LUTs")
    elif not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    return Multiplier(
        _readonly(stored), name, int(M), (("source", "lut"), *_freeze_metadata(metadata))
    )


_APPROXTRAIN_NAME = re.compile(r"_(\d+)\.bin$", re.IGNORECASE)


def from_approxtrain(path, M: int | None = None) -> Multiplier:
    """Loads an ApproxTrain LUT file (``NAME_M.bin``; one byte ``c << 7 | r`` per entry).

    Args:
      path: Path to the ``.bin`` file.
      M: Mantissa width; parsed from the ``_M.bin`` suffix if ``None``.

    Returns:
      Multiplier named after the file stem (e.g. ``"MBM_7"``).

    Raises:
      ValueError: If ``M`` cannot be determined, exceeds 7, or the file size
        is not ``4**M``.
    """
    path = pathlib.Path(path)
    if M is None:
        match = _APPROXTRAIN_NAME.search(path.name)
        if match is None:
            raise ValueError(
                f"cannot infer M from file name {path.name!r} (expected NAME_M.bin); pass M="
            )
        M = int(match.group(1))
    M = lut_lib.check_mbits(M)
    if M > lut_lib.MAX_APPROXTRAIN_MBITS:
        raise ValueError(f"ApproxTrain files hold one byte per entry, so M <= 7; got M={M}")
    data = np.fromfile(path, dtype=np.uint8)
    if data.size != lut_lib.num_entries(M):
        raise ValueError(
            f"{path} has {data.size} bytes; expected 4**M = {lut_lib.num_entries(M)} "
            f"entries for M={M}"
        )
    stored = lut_lib.validate_lut(data, M)
    metadata = (("source", "approxtrain"), ("path", str(path)))
    return Multiplier(_readonly(stored), path.stem, M, metadata)


def to_approxtrain(multiplier: Multiplier, path) -> pathlib.Path:
    """Writes a multiplier as an ApproxTrain ``.bin`` file.

    Args:
      multiplier: A single (non-stacked) LUT multiplier with ``mbits <= 7``.
      path: Output path (conventionally ``NAME_M.bin``).

    Returns:
      The path written.

    Raises:
      ValueError: For exact multipliers, stacks, or ``mbits > 7``.
    """
    if multiplier.is_exact:
        raise ValueError("the exact multiplier has no LUT to write")
    if multiplier.is_stack:
        raise ValueError("cannot write a stack of designs to one ApproxTrain file; unstack it")
    if multiplier.mbits > lut_lib.MAX_APPROXTRAIN_MBITS:
        raise ValueError(f"ApproxTrain files need M <= 7, got M={multiplier.mbits}")
    path = pathlib.Path(path)
    np.asarray(multiplier.lut, dtype=np.uint8).tofile(path)
    return path


def from_python(fn: Callable, M: int, name: str | None = None) -> Multiplier:
    """Builds a multiplier from a vectorised Python functional model (SPEC section 3).

    Args:
      fn: ``fn(a, b) -> p``, vectorised over float32 NumPy arrays of mantissas
        ``a = 1 + i/2^M``, ``b = 1 + j/2^M``; must return products in
        ``[1, 4)`` (cast to float32, as a C model's ``float`` return value).
      M: Mantissa width, 1..11.
      name: Design name (default: the function's name).

    Returns:
      Multiplier with a NumPy LUT.

    Raises:
      ValueError: If ``M`` is invalid or a product is not finite / not in
        ``[1, 4)``.
    """
    M = lut_lib.check_mbits(M)
    stored = reference.lut_from_function(fn, M)
    fn_name = getattr(fn, "__name__", "python_model")
    metadata = (("source", "python"), ("function", getattr(fn, "__qualname__", fn_name)))
    return Multiplier(_readonly(stored), name or fn_name, M, metadata)


def from_c(
    source_or_path,
    function: str,
    M: int,
    name: str | None = None,
    compiler: str | None = None,
    flags: Iterable[str] = (),
    *,
    language: str | None = None,
    cpp: bool | None = None,
) -> Multiplier:
    """Builds a multiplier from a C/C++ functional model ``float f(float a, float b)``.

    The source is compiled with ``-O2 -fPIC -shared -ffp-contract=off
    -DAPPROX_MBITS=M`` together with a generated loop that evaluates ``f`` on
    every mantissa pair; libraries and LUTs are cached on disk (see
    :mod:`approx_jax._src.cmodel`).

    Args:
      source_or_path: Source text, or a path to a ``.c``/``.cc``/``.cpp`` file.
      function: Name of the model function.
      M: Mantissa width, 1..11.
      name: Design name (default: ``function``).
      compiler: Compiler command (default ``$CC``/``$CXX`` or ``cc``/``c++``).
      flags: Extra compiler flags.
      language: ``"c"`` or ``"c++"`` (default: from the file extension; C for
        source strings).
      cpp: Shortcut for ``language``.

    Returns:
      Multiplier with a NumPy LUT.

    Raises:
      CModelError: If compilation fails (message includes compiler output).
      ValueError: If ``M`` is invalid, the function is missing, or a product is
        not in ``[1, 4)``.
    """
    M = lut_lib.check_mbits(M)
    stored = cmodel.build_lut(
        source_or_path,
        function,
        M,
        compiler=compiler,
        flags=tuple(flags),
        language=language,
        cpp=cpp,
    )
    path = cmodel.source_path(source_or_path)
    origin = str(path) if path is not None else "<source>"
    metadata = (("source", "c"), ("path", origin), ("function", function))
    return Multiplier(_readonly(stored), name or function, M, metadata)


# ---------------------------------------------------------------------------
# Name resolution
# ---------------------------------------------------------------------------

_FAMILY_PATTERN = re.compile(r"^([a-z]+)[_\-]?(\d+)$")
_C_MODEL_PATTERN = re.compile(
    r"^(?P<path>.+\.(?:c|cc|cpp|cxx|c\+\+)):(?P<fn>[A-Za-z_]\w*)@(?P<m>\d+)$"
)

VALID_NAME_FORMS = (
    "'fp32' or 'exact'",
    "'bf16' (= truncate7)",
    "'truncateM' / 'truncM' / 'accM'",
    "'mitchellM' / 'mitM'",
    "'mbmM' (M in 1..11)",
    "'path/to/NAME_M.bin' (ApproxTrain LUT file)",
    "'path/to/model.c:function@M' (C/C++ functional model)",
)


def get(name_or_multiplier) -> Multiplier:
    """Resolves a multiplier name (as used by the CLI) or passes a Multiplier through.

    Args:
      name_or_multiplier: A :class:`Multiplier`, or one of (case-insensitive)
        ``"fp32"``/``"exact"``, ``"bf16"``, ``"mbm7"``, ``"mitchell5"``,
        ``"mit5"``, ``"truncate7"``, ``"path/X_7.bin"``, ``"model.c:fn@5"``.

    Returns:
      The Multiplier.

    Raises:
      ValueError: For an unknown name (the message lists the valid forms).
      TypeError: For anything that is neither a str nor a Multiplier.
    """
    if isinstance(name_or_multiplier, Multiplier):
        return name_or_multiplier
    if isinstance(name_or_multiplier, os.PathLike):
        name_or_multiplier = os.fspath(name_or_multiplier)
    if not isinstance(name_or_multiplier, str):
        raise TypeError(f"expected a Multiplier or a name, got {type(name_or_multiplier).__name__}")
    spec = name_or_multiplier.strip()
    c_model = _C_MODEL_PATTERN.match(spec)
    if c_model:
        return from_c(pathlib.Path(c_model["path"]), c_model["fn"], int(c_model["m"]))
    if spec.lower().endswith(".bin"):
        return from_approxtrain(spec)
    key = spec.lower()
    if key in _EXACT_NAMES:
        return exact()
    if key == "bf16":
        return truncate(7)
    match = _FAMILY_PATTERN.match(key)
    if match and match[1] in _FAMILY_ALIASES:
        M = int(match[2])
        if not lut_lib.MIN_MBITS <= M <= lut_lib.MAX_MBITS:
            raise ValueError(f"{spec!r}: M must be in 1..11, got {M}")
        return _builtin(_FAMILY_ALIASES[match[1]], M)
    raise ValueError(f"unknown multiplier {spec!r}; valid forms: " + ", ".join(VALID_NAME_FORMS))


# ---------------------------------------------------------------------------
# Stacks
# ---------------------------------------------------------------------------


def stack(multipliers: Iterable) -> Multiplier:
    """Stacks designs into one Multiplier with LUT shape ``[D, 4**M]``.

    Narrower designs are widened exactly to the common ``M = max(mbits)``
    (:func:`lut.expand_lut`), so every product is unchanged. Stacks inside
    the list are flattened.

    Args:
      multipliers: Multipliers (or names accepted by :func:`get`).

    Returns:
      The stacked Multiplier; ``unstack`` restores the original widths.

    Raises:
      ValueError: If the list is empty or contains the exact multiplier.
    """
    members: list[Multiplier] = []
    for item in multipliers:
        m = get(item)
        members.extend(unstack(m) if m.is_stack else [m])
    if not members:
        raise ValueError("stack() needs at least one multiplier")
    if any(m.is_exact for m in members):
        raise ValueError(
            "the exact (fp32) multiplier has no LUT and cannot be stacked; evaluate it "
            "separately (or stack truncate(11) as a near-exact LUT design)"
        )
    M = max(m.mbits for m in members)
    luts = [lut_lib.expand_lut(np.asarray(m.lut), m.mbits, M) for m in members]
    names = tuple(str(m.name) for m in members)
    metadata = (
        ("stack_mbits", tuple(m.mbits for m in members)),
        ("stack_metadata", tuple(m.metadata for m in members)),
    )
    return Multiplier(_readonly(np.stack(luts)), names, M, metadata)


def unstack(stacked: Multiplier) -> list[Multiplier]:
    """Splits a stack into its designs (restoring each design's original width).

    Args:
      stacked: A stacked Multiplier (a single design returns ``[stacked]``).

    Returns:
      List of single-design Multipliers.
    """
    if not stacked.is_stack:
        return [stacked]
    info = stacked.info
    D = stacked.num_designs
    widths = info.get("stack_mbits", (stacked.mbits,) * D)
    member_metadata = info.get("stack_metadata", ((),) * D)
    names = stacked.names if len(stacked.names) == D else tuple(f"design{d}" for d in range(D))
    luts = np.asarray(stacked.lut)
    result = []
    for d in range(D):
        lut_d = luts[d]
        if widths[d] != stacked.mbits:
            lut_d = lut_lib.shrink_lut(lut_d, stacked.mbits, widths[d])
        result.append(Multiplier(_readonly(lut_d), names[d], widths[d], member_metadata[d]))
    return result
