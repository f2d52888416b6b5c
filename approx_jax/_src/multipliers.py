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
import decimal
import functools
import hashlib
import json
import numbers
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


def is_exact_name(spec: str) -> bool:
    """Whether ``get(spec)`` is the exact multiplier (``fp32``, ``exact``, ...), by name alone."""
    return spec.strip().lower() in _EXACT_NAMES


def _freeze(value, where: str = "metadata"):
    """Makes metadata values hashable (dicts -> sorted pairs, lists -> tuples).

    Raises:
      TypeError: If a value is unhashable and not a container converted here
        (e.g. a NumPy array), naming where in the metadata it sits.
    """
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v, f"{where}[{k!r}]")) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, set | frozenset):
        return tuple(sorted(_freeze(v, where) for v in value))
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    try:
        hash(value)
    except TypeError:
        # Metadata lives in the pytree aux data, which must be hashable; say
        # which value is at fault rather than surfacing a bare "unhashable type".
        hint = " (convert arrays with .tolist())" if isinstance(value, np.ndarray) else ""
        raise TypeError(
            f"{where} is an unhashable {type(value).__name__}; metadata values must be "
            f"hashable (str, numbers, tuples) or lists/dicts/sets of them{hint}"
        ) from None
    return value


def _freeze_metadata(metadata) -> tuple:
    """Normalises metadata (``None``, a mapping, or ``(key, value)`` pairs) to a tuple.

    Raises:
      TypeError: If ``metadata`` is not one of those forms or holds an
        unhashable value.
    """
    if metadata is None:
        return ()
    if isinstance(metadata, Mapping):
        return _freeze(metadata)
    # A str/bytes is iterable but is never a sequence of pairs.
    if isinstance(metadata, str | bytes) or not isinstance(metadata, Iterable):
        raise TypeError(
            "metadata must be a dict or a sequence of (key, value) pairs, got "
            f"{type(metadata).__name__} {metadata!r:.80}"
        )
    frozen = []
    for item in metadata:
        if isinstance(item, str | bytes) or not isinstance(item, Sequence) or len(item) != 2:
            raise TypeError(
                "metadata must be a dict or a sequence of (key, value) pairs; got the "
                f"item {item!r:.80} of type {type(item).__name__}"
            )
        key, value = item
        frozen.append((str(key), _freeze(value, f"metadata[{str(key)!r}]")))
    return tuple(frozen)


def _member_names(name: str, count: int) -> tuple[str, ...]:
    """Names of the designs of a stack given one name: ``name[0]``, ``name[1]``, ..."""
    return tuple(f"{name}[{d}]" for d in range(count))


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


def _concrete_lut(lut):
    """Returns the LUT as an array whose values can be checked, or ``None``.

    Only user code reaches ``Multiplier.__init__`` with a concrete LUT. Under a
    transformation the LUT is a tracer (``dataclasses.replace`` in
    ``ops._over_stack``) and ``tree_unflatten`` may pass placeholders (it
    bypasses ``__init__`` anyway); those, and anything else that is not a
    NumPy/JAX array or a list/scalar of numbers, are left to
    ``ops.kernel_lut_of``, which checks shape and dtype at trace time.
    """
    if lut is None or isinstance(lut, jax.core.Tracer):
        return None
    if isinstance(lut, np.ndarray):
        return lut
    if isinstance(lut, jax.Array):
        # A sharded array not fully on this host cannot be read back to check.
        return lut if lut.is_fully_addressable else None
    if isinstance(lut, list | tuple | numbers.Number):
        return np.asarray(lut)
    return None


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
        self._normalise()
        lut = _concrete_lut(self.lut)
        if lut is not None:
            stored = self._check_lut(lut)
            if lut is not self.lut or isinstance(lut, np.ndarray):
                # A list leaf would flatten to one pytree leaf per entry. A
                # NumPy LUT is kept as the checked copy, read-only: the caller's
                # array (or the writeable array a read-only view shows) may
                # change later, and the ops cache per read-only LUT.
                object.__setattr__(self, "lut", _readonly(stored))

    @classmethod
    def _trusted(cls, lut, name, mbits: int, metadata=()) -> Multiplier:
        """Builds a Multiplier whose LUT a library constructor already validated.

        Skips :meth:`_check_lut`, which reads every entry: ``get("mbm11")``
        runs on every op call given a name, and its LUT is validated once when
        built.
        """
        obj = object.__new__(cls)
        object.__setattr__(obj, "lut", lut)
        object.__setattr__(obj, "name", name)
        object.__setattr__(obj, "mbits", mbits)
        object.__setattr__(obj, "metadata", metadata)
        obj._normalise()
        return obj

    def _normalise(self):
        """Checks ``mbits`` against the LUT's presence; freezes name and metadata."""
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
        if isinstance(self.name, str) and np.ndim(self.lut) == 2:
            # One name for a stack: one per design, as from_lut names them (a
            # single name left the stack's names and design count at odds).
            names = _member_names(self.name, np.shape(self.lut)[0])
            object.__setattr__(self, "name", names)

    def _check_lut(self, lut) -> np.ndarray:
        """Validates a concrete LUT as :func:`from_lut` does (SPEC section 3).

        Returns:
          The LUT as a NumPy array of the stored dtype.

        Raises:
          TypeError: If the LUT does not have an integer dtype.
          ValueError: If its shape or an entry does not fit width ``mbits``, or
            a stack's names do not match its designs.
        """
        M = self.mbits
        try:
            stored = lut_lib.validate_lut(lut, M)
        except (TypeError, ValueError) as error:
            hint = ""
            words = np.asarray(lut)
            if (
                isinstance(error, ValueError)
                and np.issubdtype(words.dtype, np.integer)
                and words.size
                and words.min() >= 0
                and 1 << (23 - M) <= words.max() < 1 << 24
                and not np.any(words & ((1 << (23 - M)) - 1))
            ):
                # Entries (c << 23) | (r << (23 - M)) are kernel_lut() output, a
                # likely mix-up since both are "the LUT" of a Multiplier.
                hint = (
                    "; these look like kernel-format entries (Multiplier.kernel_lut()): "
                    "pass the stored-format Multiplier.lut instead"
                )
            raise type(error)(
                f"invalid lut for Multiplier {self.name!r} with mbits={M}: {error}{hint}"
            ) from None
        if isinstance(self.name, tuple) and lut.ndim == 2 and len(self.name) != lut.shape[0]:
            raise ValueError(
                f"name has {len(self.name)} entries for a stack of {lut.shape[0]} LUTs: "
                f"{self.name!r}"
            )
        return stored

    # -- pytree protocol ----------------------------------------------------
    def tree_flatten(self):
        """Returns ``((lut,), aux)``; see :class:`_Label` for the aux data.

        A stack's member widths key the structure (unlike names and other
        metadata): ``unstack`` and ``characterize`` restore each member at its
        width, so a cached jit must not hand back another stack's widths.
        """
        widths = dict(self.metadata).get("stack_mbits")
        return (self.lut,), (self.mbits, widths, _Label(self.name, self.metadata))

    @classmethod
    def tree_unflatten(cls, aux, children):
        """Rebuilds a Multiplier without validation (leaves may be tracers)."""
        mbits, _, label = aux
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

    # -- value semantics ----------------------------------------------------
    def _value_key(self):
        """``(name, mbits, metadata, LUT digest)``, or None for a non-concrete LUT.

        Computed once per object (the digest reads the whole LUT: ~7 ms for
        the 8 MiB stored LUT of M = 11).
        """
        key = self.__dict__.get("_cached_value_key")
        if key is None:
            if self.lut is None:
                digest = None
            else:
                lut = _concrete_lut(self.lut)
                if lut is None:  # a tracer: no value to compare
                    return None
                words = np.ascontiguousarray(np.asarray(lut))
                digest = (
                    words.dtype.str,
                    words.shape,
                    hashlib.sha256(words).hexdigest(),  # the buffer itself, no copy
                )
            key = (self.name, self.mbits, self.metadata, digest)
            object.__setattr__(self, "_cached_value_key", key)
        return key

    def __eq__(self, other):
        """Equal when name, width, metadata and every LUT entry are equal.

        Value equality lets a Multiplier (or a layer hook holding one) be a
        ``jax.jit`` static argument or part of an ``nnx`` graph definition
        without one compilation per freshly built, identical object. A
        Multiplier whose LUT is a tracer equals only itself.
        """
        if not isinstance(other, Multiplier):
            return NotImplemented
        if self is other:
            return True
        mine, theirs = self._value_key(), other._value_key()
        return mine is not None and mine == theirs

    def __hash__(self):
        key = self._value_key()
        return object.__hash__(self) if key is None else hash(key)

    def __repr__(self):
        if self.is_exact:
            return "Multiplier(fp32, exact)"
        if self.is_stack:
            shown = ", ".join(self.names[:4]) + (", ..." if len(self.names) > 4 else "")
            # repr must not raise; flag a stack whose names no longer match its LUTs.
            bad = " (names do not match the LUTs)" if _stack_mismatch(self) else ""
            return f"Multiplier(stack of {self.num_designs}{bad}: [{shown}], M={self.mbits})"
        return f"Multiplier({self.name}, M={self.mbits})"


# ---------------------------------------------------------------------------
# Constructors
# ---------------------------------------------------------------------------


def _encode_aux_value(value):
    """A frozen name / metadata value as JSON (tuples tagged; other types by repr)."""
    if isinstance(value, tuple):
        return {"tuple": [_encode_aux_value(v) for v in value]}
    if value is None or isinstance(value, str | bool | int | float):
        return value
    return {"repr": repr(value)}


def _decode_aux_value(value):
    if isinstance(value, dict):
        if "tuple" in value:
            return tuple(_decode_aux_value(v) for v in value["tuple"])
        return value["repr"]
    return value


def _serialize_aux(aux) -> bytes:
    mbits, widths, label = aux
    return json.dumps(
        {
            "mbits": mbits,
            "widths": _encode_aux_value(widths),
            "name": _encode_aux_value(label.name),
            "metadata": _encode_aux_value(label.metadata),
        }
    ).encode()


def _deserialize_aux(data: bytes):
    fields = json.loads(data)
    label = _Label(_decode_aux_value(fields["name"]), _decode_aux_value(fields["metadata"]))
    return fields["mbits"], _decode_aux_value(fields["widths"]), label


# A Multiplier passed to an exported function is part of its calling
# convention (in_tree), which jax.export serialises by registered name.
if hasattr(jax.export, "register_pytree_node_serialization"):
    jax.export.register_pytree_node_serialization(
        Multiplier,
        serialized_name="approx_jax.Multiplier",
        serialize_auxdata=_serialize_aux,
        deserialize_auxdata=_deserialize_aux,
    )


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
    compiler = cmodel.find_compiler()
    if compiler is None or not cmodel.compiler_runs(compiler):
        # (The NumPy implementations give the same LUTs: tests compare them.)
        missing = f"C compiler {compiler!r} not found" if compiler else "no C compiler found"
        warnings.warn(
            f"{missing}: building the built-in {family}({M}) LUT with the "
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
    return Multiplier._trusted(_builtin_lut(family, M), f"{family}{M}", M, metadata)


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


def _flatten_square_table(arr: np.ndarray, M: int | None) -> np.ndarray:
    """``[..., 2**M, 2**M]`` integer entries indexed ``[i, j]`` -> ``[..., 4**M]``.

    Only where the square reading is the intended one: ``M`` is given and the
    last axis has ``2**M`` (not ``4**M``) entries, or ``M`` is not given and
    the last axis is ``2**m`` entries for an ``m`` in range but not ``4**m'``
    for any (a ``[4, 4]`` array stays a stack of four M = 1 LUTs unless M = 2).
    """
    if arr.ndim < 2 or arr.shape[-1] != arr.shape[-2]:
        return arr
    side = arr.shape[-1]
    widths = range(lut_lib.MIN_MBITS, lut_lib.MAX_MBITS + 1)
    if M is not None:
        square = side == 1 << M and side != lut_lib.num_entries(M)
    else:
        square = side in {1 << m for m in widths} and side not in {
            lut_lib.num_entries(m) for m in widths
        }
    return arr.reshape(arr.shape[:-2] + (side * side,)) if square else arr


def from_lut(array, M: int | None = None, name: str | Sequence[str] = "custom", metadata=()):
    """Wraps a LUT given as stored-format integers or as product values.

    Args:
      array: Either a stored-format integer array, shape ``[4**M]`` or
        ``[D, 4**M]`` (a stack), or ``[2**M, 2**M]`` / ``[D, 2**M, 2**M]``
        indexed ``[i, j]`` (when the last axis is not itself ``4**M``
        entries, or ``M`` says so); or a float array of ``4**M`` products ``p`` in
        ``[1, 4)`` for each ``(i, j)`` (any shape, ``i``-major, e.g.
        ``[2**M, 2**M]``), encoded by SPEC section 3.
      M: Mantissa width; inferred from the number of entries if ``None``.
      name: Design name (for a stack, a name or one name per design).
      metadata: Extra ``(key, value)`` pairs or a dict.

    Returns:
      A Multiplier holding a NumPy LUT.

    Raises:
      TypeError: If ``array`` is not an array of integers or floats, ``name``
        is not a str (or names for a stack), or ``metadata`` is not a dict or
        ``(key, value)`` pairs of hashable values.
      ValueError: If the size does not match ``4**M`` or entries are out of range.
    """
    arr = np.asarray(array)
    if arr.ndim == 0:
        # A scalar would otherwise be reported as "a LUT of 0 entries".
        raise TypeError(
            f"from_lut expects an array of 4**M LUT entries, got {type(array).__name__} "
            f"{array!r:.80}"
        )
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
                f"got {type(array).__name__} of dtype {arr.dtype}"
            )
        flat = _flatten_square_table(arr, M)
        # A square array left as it is was read as a stack of LUTs.
        square_as_stack = flat is arr and arr.ndim >= 2 and arr.shape[-1] == arr.shape[-2]
        arr = flat
        if M is None:
            M = _infer_mbits(arr.shape[-1] if arr.ndim else 0, "LUT")
        try:
            stored = lut_lib.validate_lut(arr, lut_lib.check_mbits(M))
        except ValueError as err:
            if square_as_stack:  # perhaps a [2**M, 2**M] table was meant
                side = arr.shape[-1]
                raise ValueError(
                    f"{err} (the [{side}, {side}] array was read as a stack of {side} LUTs of "
                    f"M={M}; for one [2**M, 2**M] table indexed [i, j] pass M="
                    f"{side.bit_length() - 1})"
                ) from err
            raise
    if stored.ndim == 2:
        if isinstance(name, str):
            name = _member_names(name, stored.shape[0])
        if not isinstance(name, Sequence) or not all(isinstance(n, str) for n in name):
            raise TypeError(f"name of a stack must be a str or a sequence of str, got {name!r:.80}")
        name = tuple(name)
        if len(name) != stored.shape[0]:
            raise ValueError(f"got {len(name)} names for a stack of {stored.shape[0]} LUTs")
    elif not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    return Multiplier._trusted(
        _readonly(stored), name, int(M), (("source", "lut"), *_freeze_metadata(metadata))
    )


_APPROXTRAIN_NAME = re.compile(r"_(\d+)\.bin$", re.IGNORECASE)


def _as_path(path) -> pathlib.Path:
    """``path`` as a ``pathlib.Path``; a ``TypeError`` naming ``path`` for anything else."""
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    return pathlib.Path(path)


def from_approxtrain(path, M: int | None = None) -> Multiplier:
    """Loads an ApproxTrain LUT file (``NAME_M.bin``).

    Two layouts are read, told apart by the file size:

    * ``4**M`` bytes: ApproxTrain's current format (what its ``lut_gen.cc``
      writes and the published ``MBM_7.bin`` etc. hold), one byte
      ``c << 7 | r`` per entry, so ``M <= 7``.
    * ``4 * 4**M`` bytes: its earlier format (``mbmmantmul16.bin`` and the
      ``lut_gen.cc`` of that time), one little-endian 32-bit word per entry
      holding the carry in bit 31 and ``r`` in place in the float32 mantissa
      field (``r << (23 - M)``); any ``M <= 11``. Such files often have no
      ``_M`` suffix: pass ``M``.

    Args:
      path: Path to the ``.bin`` file.
      M: Mantissa width; parsed from the ``_M.bin`` suffix if ``None``.

    Returns:
      Multiplier named after the file stem (e.g. ``"MBM_7"``).

    Raises:
      ValueError: If ``M`` cannot be determined or is out of range, the file
        size fits neither layout, or a 32-bit entry has bits set outside the
        carry and the M mantissa bits.
      TypeError: If ``path`` is not a str or path-like object.
    """
    path = _as_path(path)
    if not path.exists():  # (before the name: a missing file is the first thing to say)
        raise FileNotFoundError(f"no such LUT file: {str(path)!r}")
    if M is None:
        match = _APPROXTRAIN_NAME.search(path.name)
        if match is None:
            raise ValueError(
                f"cannot infer M from file name {path.name!r} (expected NAME_M.bin); pass M= "
                f"(as a multiplier name or on the command line: '{path}@M', e.g. '{path}@7')"
            )
        M = int(match.group(1))
    M = lut_lib.check_mbits(M)
    data = np.fromfile(path, dtype=np.uint8)
    entries = lut_lib.num_entries(M)
    if data.size == 4 * entries:
        stored = _from_approxtrain_words(data.view("<u4"), M, path)
        layout = "approxtrain-uint32"
    elif M > lut_lib.MAX_APPROXTRAIN_MBITS:
        raise ValueError(
            f"{path} has {data.size} bytes; for M={M} (> 7, beyond one byte per entry) "
            f"an ApproxTrain file must hold 32-bit entries: 4 * 4**M = {4 * entries} bytes"
        )
    elif data.size == entries:
        stored = lut_lib.validate_lut(data, M)
        layout = "approxtrain"
    else:
        raise ValueError(
            f"{path} has {data.size} bytes; expected 4**M = {entries} one-byte entries "
            f"or 4 * 4**M = {4 * entries} bytes of 32-bit entries for M={M}"
        )
    metadata = (("source", layout), ("path", str(path)))
    return Multiplier._trusted(_readonly(stored), path.stem, M, metadata)


def _from_approxtrain_words(words: np.ndarray, M: int, path) -> np.ndarray:
    """Converts ApproxTrain's 32-bit entries (carry bit 31, r << (23 - M)) to the stored format."""
    words = words.astype(np.uint32)
    carry = words >> 31
    r = (words >> (23 - M)) & ((1 << M) - 1)
    stray = words & ~np.uint32((1 << 31) | (((1 << M) - 1) << (23 - M)))
    if np.any(stray):
        k = int(np.flatnonzero(stray)[0])
        raise ValueError(
            f"{path}: 32-bit entry {k} = {int(words[k]):#010x} has bits set outside the carry "
            f"(bit 31) and the M={M} mantissa bits (bits {23 - M}..22); wrong M?"
        )
    return lut_lib.encode(carry, r, M)


def to_approxtrain(multiplier: Multiplier | str, path) -> pathlib.Path:
    """Writes a multiplier as an ApproxTrain ``.bin`` file.

    Args:
      multiplier: A single (non-stacked) LUT multiplier with ``mbits <= 7``,
        or a name accepted by :func:`get`.
      path: Output path (conventionally ``NAME_M.bin``).

    Returns:
      The path written.

    Raises:
      ValueError: For exact multipliers, stacks, or ``mbits > 7``.
      TypeError: If ``multiplier`` is neither a Multiplier nor a name, or
        ``path`` is not a str or path-like object.
    """
    multiplier = get(multiplier)
    if multiplier.is_exact:
        raise ValueError("the exact multiplier has no LUT to write")
    if multiplier.is_stack:
        raise ValueError("cannot write a stack of designs to one ApproxTrain file; unstack it")
    if multiplier.mbits > lut_lib.MAX_APPROXTRAIN_MBITS:
        raise ValueError(f"ApproxTrain files need M <= 7, got M={multiplier.mbits}")
    path = _as_path(path)
    np.asarray(multiplier.lut, dtype=np.uint8).tofile(path)
    return path


def _call_per_pair(fn: Callable, a: np.ndarray, b: np.ndarray, what: str, vector_error) -> list:
    """``fn`` evaluated on each mantissa pair as float32 scalars (a scalar model)."""
    pairs = zip(a.tolist(), b.tolist(), strict=True)
    if a.size >= 1 << 16:
        from tqdm.auto import tqdm

        pairs = tqdm(pairs, total=a.size, desc=f"{what}, one call per pair", leave=False)
    out = []
    for x, y in pairs:
        try:
            out.append(fn(np.float32(x), np.float32(y)))
        except Exception as err:
            message = (
                f"{what} failed on arrays ({type(vector_error).__name__}: {vector_error}) and "
                f"on the scalars a={x!r}, b={y!r} ({type(err).__name__}: {err})"
            )
            try:
                wrapped = type(err)(message)
            except Exception:  # noqa: BLE001 (an exception type with another constructor)
                wrapped = ValueError(message)
            raise wrapped from err
    return out


def _is_real_number(x) -> bool:
    """A real number that is not a bool (Fraction, Decimal, NumPy and Python scalars)."""
    return isinstance(x, (numbers.Real, decimal.Decimal)) and not isinstance(x, (bool, np.bool_))


def from_python(fn: Callable, M: int, name: str | None = None) -> Multiplier:
    """Builds a multiplier from a Python functional model (SPEC section 3).

    The model is first called once on arrays of every mantissa pair. A model
    written for scalars (``if a > 1.5: ...``, ``math.log2(a)``), which raises
    on arrays, is then called once per pair with float32 scalars instead
    (``4**M`` calls: seconds at M = 11, with a progress bar).

    Args:
      fn: ``fn(a, b) -> p`` over float32 mantissas ``a = 1 + i/2^M``,
        ``b = 1 + j/2^M``: vectorised over NumPy arrays of shape ``[4**M]``
        (returning shape ``[4**M]``, or a scalar for a constant model), or
        scalar. Products must be real, in ``[1, 4)``; they are cast to float32
        as a C model's ``float`` return value.
      M: Mantissa width, 1..11.
      name: Design name (default: the function's name).

    Returns:
      Multiplier with a NumPy LUT.

    Raises:
      TypeError: If ``fn`` is not callable or returns something other than
        real numbers (``None``, complex, strings...).
      ValueError: If ``M`` is invalid, the result's shape is not ``(4**M,)``,
        or a product is not finite / not in ``[1, 4)``.

    Example:
      >>> def shift_add(a, b):  # scalar model: one call per mantissa pair
      ...     return a + b - 1.0 if a + b < 3.0 else 2.0 * (a + b - 2.0)
      >>> m = from_python(shift_add, 5)
    """
    if not callable(fn):
        raise TypeError(f"fn must be a callable fn(a, b) -> p, got {type(fn).__name__}")
    M = lut_lib.check_mbits(M)
    fn_name = getattr(fn, "__name__", "python_model")
    qualname = getattr(fn, "__qualname__", fn_name)
    what = f"Python model {qualname!r}"
    a, b = reference.mantissa_grid(M)
    try:
        products = fn(a, b)
    except Exception as vector_error:  # noqa: BLE001 (any failure: try the scalar form)
        products = _call_per_pair(fn, a, b, what, vector_error)
    try:
        p = np.asarray(products)
    except ValueError as err:  # ragged: a tuple of an array and a scalar, ...
        raise ValueError(
            f"{what} must return one product per (a, b) pair, shape ({a.size},) (4**M for "
            f"M={M}); it returned {type(products).__name__} that is not an array ({err})"
        ) from err
    if p.dtype == object and all(_is_real_number(x) for x in p.flat):
        # Exact real types (fractions.Fraction, decimal.Decimal) from a scalar model.
        p = np.array([float(x) for x in p.flat], dtype=np.float64).reshape(p.shape)
    # Checked here, before any cast: np.asarray(None) is an object array that
    # float32 turns into NaN, and a complex one silently loses its imaginary part.
    if p.dtype == np.bool_ or p.dtype.kind not in "iuf":
        raise TypeError(
            f"{what} must return real products, an array of shape ({a.size},) (4**M for "
            f"M={M}); it returned {type(products).__name__} of dtype {p.dtype}"
        )
    if p.shape not in ((), (1,), a.shape):
        raise ValueError(
            f"{what} must return one product per (a, b) pair, shape ({a.size},) (4**M for "
            f"M={M}); it returned shape {p.shape}"
        )
    stored = lut_lib.encode_products(np.broadcast_to(p, a.shape), M, what=what)
    metadata = (("source", "python"), ("function", qualname))
    return Multiplier._trusted(_readonly(stored), name or fn_name, M, metadata)


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
      flags: Extra compiler flags: a sequence of strings, or one string split
        like a shell command line.
      language: ``"c"`` or ``"c++"`` (default: from the file extension; C for
        source strings).
      cpp: Shortcut for ``language``.

    Returns:
      Multiplier with a NumPy LUT.

    Raises:
      CModelError: If compilation fails (message includes compiler output),
        or the model crashes, exits or times out while the LUT is built (it
        runs in a child process).
      ValueError: If ``M`` is invalid, the function is missing, or a product is
        not in ``[1, 4)``.
    """
    M = lut_lib.check_mbits(M)
    stored = cmodel.build_lut(
        source_or_path,
        function,
        M,
        compiler=compiler,
        flags=flags if isinstance(flags, str) else tuple(flags),
        language=language,
        cpp=cpp,
    )
    path = cmodel.source_path(source_or_path)
    origin = str(path) if path is not None else "<source>"
    metadata = (("source", "c"), ("path", origin), ("function", function))
    return Multiplier._trusted(_readonly(stored), name or function, M, metadata)


# ---------------------------------------------------------------------------
# Name resolution
# ---------------------------------------------------------------------------

_FAMILY_PATTERN = re.compile(r"^([a-z]+)[_\-]?(\d+)$")
_C_MODEL_PATTERN = re.compile(
    r"^(?P<path>.+\.(?:c|C|cc|cpp|cxx|c\+\+)):(?P<fn>[A-Za-z_]\w*)@(?P<m>\d+)$"
)

_LUT_FILE_PATTERN = re.compile(r"^(?P<path>.+\.bin)@(?P<m>\d+)$", re.IGNORECASE)

VALID_NAME_FORMS = (
    "'fp32' or 'exact'",
    "'bf16' / 'bfloat16' (= truncate7)",
    "'truncateM' / 'truncM' / 'accM'",
    "'mitchellM' / 'mitM'",
    "'mbmM' (M in 1..11)",
    "'path/to/NAME_M.bin' or 'path/to/file.bin@M' (ApproxTrain LUT file)",
    "'path/to/model.c:function@M' (C/C++ functional model)",
)


def get(name_or_multiplier) -> Multiplier:
    """Resolves a multiplier name (as used by the CLI) or passes a Multiplier through.

    Args:
      name_or_multiplier: A :class:`Multiplier`, or one of (case-insensitive)
        ``"fp32"``/``"exact"``, ``"bf16"``/``"bfloat16"``, ``"mbm7"``, ``"mitchell5"``,
        ``"mit5"``, ``"truncate7"``, ``"path/X_7.bin"``,
        ``"path/lut.bin@7"`` (an ApproxTrain file without the ``_M``
        suffix), ``"model.c:fn@5"``.

    Returns:
      The Multiplier.

    Raises:
      ValueError: For an unknown name (the message lists the valid forms).
      TypeError: For anything that is neither a str nor a Multiplier.
    """
    return _get(name_or_multiplier, "multiplier")


def _get(name_or_multiplier, argname: str) -> Multiplier:
    """:func:`get`, naming the argument ``argname`` in its ``TypeError``."""
    if isinstance(name_or_multiplier, Multiplier):
        return name_or_multiplier
    if isinstance(name_or_multiplier, os.PathLike):
        name_or_multiplier = os.fspath(name_or_multiplier)
    if not isinstance(name_or_multiplier, str):
        raise TypeError(
            f"{argname} must be an approx_jax Multiplier or a name such as 'mbm7', "
            f"got {type(name_or_multiplier).__name__}"
        )
    spec = name_or_multiplier.strip()
    c_model = _C_MODEL_PATTERN.match(spec)
    if c_model:
        return from_c(pathlib.Path(c_model["path"]), c_model["fn"], int(c_model["m"]))
    if spec.lower().endswith(".bin"):
        return from_approxtrain(spec)
    lut_file = _LUT_FILE_PATTERN.match(spec)
    if lut_file:
        return from_approxtrain(lut_file["path"], int(lut_file["m"]))
    key = spec.lower()
    if is_exact_name(key):
        return exact()
    if key in ("bf16", "bfloat16"):
        return truncate(7)
    match = _FAMILY_PATTERN.match(key)
    if match and match[1] in _FAMILY_ALIASES:
        M = int(match[2])
        if not lut_lib.MIN_MBITS <= M <= lut_lib.MAX_MBITS:
            raise ValueError(f"{spec!r}: M must be in 1..11, got {M}")
        return _builtin(_FAMILY_ALIASES[match[1]], M)
    if re.match(r"^.+\.(?:c|C|cc|cpp|cxx|c\+\+)(?::.*)?$", spec):
        raise ValueError(
            f"{spec!r}: a C model needs its function and mantissa width, as "
            "'path/to/model.c:function@M' (M in 1..11)"
        )
    raise ValueError(f"unknown multiplier {spec!r}; valid forms: " + ", ".join(VALID_NAME_FORMS))


# ---------------------------------------------------------------------------
# Stacks
# ---------------------------------------------------------------------------


def check_design_sequence(designs, expected: str) -> None:
    """Rejects a single design where a sequence of designs is expected.

    A str is iterable, so ``"mbm7"`` would otherwise be taken as the designs
    ``"m"``, ``"b"``, ...

    Args:
      designs: the value to check.
      expected: what the caller takes, the start of the error message.

    Raises:
      TypeError: If ``designs`` is a name, path or Multiplier, or not iterable.
    """
    if isinstance(designs, str | bytes | os.PathLike | Multiplier) or not isinstance(
        designs, Iterable
    ):
        raise TypeError(f"{expected}; got a single {type(designs).__name__} {designs!r:.80}")


def designs_of(multipliers: Iterable) -> list[Multiplier]:
    """The single designs of a sequence of multipliers (or names): stacks unstacked.

    Args:
      multipliers: Multipliers or names accepted by :func:`get`.

    Returns:
      One Multiplier per design, in order.
    """
    members: list[Multiplier] = []
    for index, item in enumerate(multipliers):
        m = _get(item, f"multipliers[{index}]")
        members.extend(unstack(m) if m.is_stack else [m])
    return members


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
      TypeError: If ``multipliers`` is a single name or Multiplier rather than
        a sequence of them.
      ValueError: If the list is empty or contains the exact multiplier.
    """
    check_design_sequence(
        multipliers,
        "stack takes a sequence of multipliers or names, e.g. stack(['mbm7', 'mitchell7'])",
    )
    members = designs_of(multipliers)
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
    # Members were validated when built; expand_lut re-encodes every entry.
    return Multiplier._trusted(_readonly(np.stack(luts)), names, M, metadata)


def unstack(stacked: Multiplier) -> list[Multiplier]:
    """Splits a stack into its designs (restoring each design's original width).

    Args:
      stacked: A stacked Multiplier (a single design returns ``[stacked]``).

    Returns:
      List of single-design Multipliers.

    Raises:
      ValueError: If the stack's names or per-design metadata do not match its
        number of LUTs (e.g. a stack sliced with ``jax.tree.map``).
    """
    if not stacked.is_stack:
        return [stacked]
    mismatch = _stack_mismatch(stacked)
    if mismatch:
        raise ValueError(
            f"cannot unstack: {mismatch}. The names and per-design widths are static "
            "pytree data that jax.tree.map does not slice; select designs with "
            "stack(unstack(s)[i:j]) instead of slicing the LUT"
        )
    info = stacked.info
    D = stacked.num_designs
    widths = info.get("stack_mbits", (stacked.mbits,) * D)
    # A stack built by from_lut has one metadata for all its designs.
    shared = tuple((k, v) for k, v in stacked.metadata if not k.startswith("stack_"))
    member_metadata = info.get("stack_metadata", (shared,) * D)
    # A single design whose LUT a tree map stacked keeps its one str name.
    names = stacked.names if len(stacked.names) == D else tuple(f"design{d}" for d in range(D))
    luts = np.asarray(stacked.lut)
    result = []
    for d in range(D):
        lut_d = luts[d]
        if widths[d] != stacked.mbits:
            lut_d = lut_lib.shrink_lut(lut_d, stacked.mbits, widths[d])
        result.append(Multiplier(_readonly(lut_d), names[d], widths[d], member_metadata[d]))
    return result


def _stack_mismatch(stacked: Multiplier) -> str:
    """Describes how a stack's static data disagrees with its LUT ("" if it agrees).

    Slicing a stack's LUT leaf (``jax.tree.map(lambda l: l[1:], s)``) keeps
    the aux data of all the original designs.
    """
    D = stacked.num_designs
    if isinstance(stacked.name, tuple) and len(stacked.name) != D:
        return f"it has {D} LUTs but {len(stacked.name)} names {stacked.name!r}"
    info = stacked.info
    for key in ("stack_mbits", "stack_metadata"):
        if key in info and len(info[key]) != D:
            return f"it has {D} LUTs but {key} for {len(info[key])} designs"
    return ""
