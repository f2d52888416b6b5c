"""Loads the native kernel modules and registers their XLA FFI targets.

The native modules expose only ``registrations()`` (a dict of target name to
handler capsule); this is the one place that registers them with JAX, for the
CPU module always and for the CUDA module when it was built.
"""

from __future__ import annotations

import importlib
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import export

GEMM_TARGET = "approx_jax_gemm"
MULTIPLY_TARGET = "approx_jax_multiply"
# CPU only: a convolution's GEMM on its patch matrix read in place, and its
# kernel gradient's GEMM on the transposed patch matrix read in place.
CONV_TARGET = "approx_jax_conv"
CONV_WGRAD_TARGET = "approx_jax_conv_wgrad"
# The GEMM and conv targets' ``family`` attribute: xla_kernels/lut_family.h's LutFamily
# (0 none, 1 Mitchell, 2 truncate, 3 MBM) that the LUT is known to equal, or
# -1 when not known (the CPU kernel then checks the LUT itself).
FAMILY_UNKNOWN = -1
# Per-LUT facts (xla_kernels/lut_family.h): a traced LUT's family and format,
# found once per compiled step by this target and read by every GEMM and conv
# target of the step (their ``lut_facts`` operand, -1 = unknown), so that
# they need not check 4^M entries per design and call. (CPU; on a GPU the
# target answers "unknown".)
LUT_FACTS_TARGET = "approx_jax_lut_facts"
LUT_FACTS_UNKNOWN = -1
# The facts' flags "every entry in kernel format" and "bits below the M
# mantissa bits clear" (lut_family.h), which every LUT made by
# ``ops.kernel_lut_of`` has.
LUT_FACTS_FLAGS = 4 | 8
# From this M on a LUT is large enough (1M entries, 4 MiB, and more) for the
# per-call checks to matter; below it the kernels check it themselves
# (measured, LeNet-300-100 step over four designs: M = 11 52 -> 21 ms, M = 9
# 14.6 -> 13.3 ms), and a vmapped op stays one custom call.
LUT_FACTS_MIN_BITS = 10

_load_error: Exception | None = None
_registered_platforms: list[str] = []


def _names_module(err: ImportError, module: str) -> bool:
    """Whether ``err`` is about ``module`` itself: absent (its full name) or
    failing to load (an extension module's error names it without the package)."""
    return err.name in (module, module.rpartition(".")[2])


def _register_all() -> None:
    global _load_error
    try:
        cpu = importlib.import_module("approx_jax._cpu_kernels")
    except ImportError as err:
        if not _names_module(err, "approx_jax._cpu_kernels"):
            # Not the module itself (absent: a source checkout without a
            # build; or failing to load): e.g. the package half initialised
            # by another thread's import. Recorded, it would disable the
            # kernels for the life of the process.
            raise
        _load_error = err
        return
    for name, capsule in cpu.registrations().items():
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    _registered_platforms.append("cpu")
    try:
        cuda = importlib.import_module("approx_jax._cuda_kernels")
    except ImportError as err:
        if not _names_module(err, "approx_jax._cuda_kernels"):
            raise
        return  # built without nvcc (CPU only), or no CUDA runtime to load it
    for name, capsule in cuda.registrations().items():
        jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
    _registered_platforms.append("cuda")


_register_all()


def registered_platforms() -> tuple[str, ...]:
    """Returns the platforms whose approx_jax kernels are registered.

    Returns:
      A tuple such as ``("cpu",)`` or ``("cpu", "cuda")``.
    """
    return tuple(_registered_platforms)


def export_disabled_checks() -> list:
    """Safety checks to disable when ``jax.export``-ing approx_jax computations.

    ``jax.export`` refuses custom calls that have no compatibility guarantee,
    which includes every approx_jax kernel. Exported code calls the kernels
    of the approx_jax installed where it runs, so export and run with the
    same approx_jax version.

    Returns:
      A list of ``jax.export.DisabledSafetyCheck`` (one per approx_jax FFI
      target) for ``jax.export.export(fn, disabled_checks=...)``.

    Example:
      >>> exported = jax.export.export(
      ...     jax.jit(f), disabled_checks=approx_jax.export_disabled_checks())(x)
    """
    targets = (GEMM_TARGET, MULTIPLY_TARGET, CONV_TARGET, CONV_WGRAD_TARGET, LUT_FACTS_TARGET)
    return [export.DisabledSafetyCheck.custom_call(name) for name in targets]


def _installed_elsewhere(here: pathlib.Path) -> str | None:
    """Another approx_jax on sys.path than ``here`` that has the native module, if any.

    (Running ``python -m pytest`` or ``python script.py`` in a source
    checkout puts the checkout's ``approx_jax/``, which has no built module,
    ahead of the installed package.)
    """
    for entry in sys.path:
        candidate = pathlib.Path(entry or ".").resolve() / "approx_jax"
        if candidate != here and any(candidate.glob("_cpu_kernels*")):
            return str(candidate)
    return None


def _require_kernels() -> None:
    if _load_error is not None:
        here = pathlib.Path(__file__).resolve().parent.parent
        installed = _installed_elsewhere(here)
        if installed is not None:
            hint = (
                f" This approx_jax is the source tree at {here}, which shadows the installed "
                f"package at {installed}: run from another directory, use `pytest` rather than "
                "`python -m pytest` in the checkout, or build in place with "
                "`tools/build_inplace.sh`."
            )
        else:
            hint = " Install the package with `pip install .`."
        raise RuntimeError(
            f"approx_jax's native kernels are not built or failed to load ({_load_error}).{hint}"
        )


def _result_type(shape, like, dtype=jnp.float32) -> jax.ShapeDtypeStruct:
    # Inside shard_map the operand types carry manual mesh axes; the result
    # type must carry the same ones or the custom_vjp backward pass rejects it.
    try:
        sharding = jax.typeof(like).sharding
        if len(sharding.spec) > len(shape):
            sharding = sharding.update(spec=sharding.spec[: len(shape)])
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    except Exception:  # noqa: BLE001 - older jax or concrete arrays
        return jax.ShapeDtypeStruct(shape, dtype)


def call_target(
    target: str, result: jax.ShapeDtypeStruct, *operands: jax.Array, mbits: int, **attrs
) -> jax.Array:
    """Calls one of the approx_jax FFI targets (the only place that does).

    Args:
      target: ``GEMM_TARGET``, ``MULTIPLY_TARGET``, ``CONV_TARGET``,
        ``CONV_WGRAD_TARGET`` or ``LUT_FACTS_TARGET``.
      result: Result type (shape, dtype, and sharding where it matters).
      *operands: The target's operands in its canonical layout: ``a``, ``b``
        (float32), ``klut`` (uint32 kernel-format LUTs ``[Gl, 4**mbits]``) and,
        for the GEMM and conv targets, ``lut_facts`` (int32 ``[Gl]``); the
        LUT facts target takes ``klut`` alone.
      mbits: Mantissa width M.
      **attrs: The target's other attributes (the GEMM and conv targets:
        ``family`` as int32; the conv targets also ``window``, ``strides``,
        ``dilation`` as int64 arrays).

    Returns:
      The custom call's result.
    """
    _require_kernels()
    return jax.ffi.ffi_call(target, result)(*operands, mbits=np.int32(mbits), **attrs)


def unknown_lut_facts(klut: jax.Array) -> jax.Array:
    """int32 ``[Gl]`` of ``LUT_FACTS_UNKNOWN``: the kernels check ``klut`` themselves."""
    return jnp.full((klut.shape[0],), LUT_FACTS_UNKNOWN, jnp.int32)


def lut_facts_call(klut: jax.Array, mbits: int) -> jax.Array:
    """Calls the ``approx_jax_lut_facts`` custom call.

    Args:
      klut: uint32 kernel-format LUTs ``[Gl, 4**mbits]``.
      mbits: mantissa width M.

    Returns:
      int32 ``[Gl]``: each LUT's facts (xla_kernels/lut_family.h) on the CPU,
      ``LUT_FACTS_UNKNOWN`` on a GPU.
    """
    result = _result_type((klut.shape[0],), klut, jnp.int32)
    return call_target(LUT_FACTS_TARGET, result, klut, mbits=mbits)


def gemm_call(
    a: jax.Array,
    b: jax.Array,
    klut: jax.Array,
    mbits: int,
    family: int = FAMILY_UNKNOWN,
    lut_facts: jax.Array | None = None,
) -> jax.Array:
    """Calls the ``approx_jax_gemm`` custom call (canonical rank-4 layout).

    Args:
      a: float32 ``[Ga, Ba, M, K]``.
      b: float32 ``[Gb, Bb, K, N]``.
      klut: uint32 kernel-format LUTs ``[Gl, 4**mbits]``.
      mbits: mantissa width M.
      family: the closed-form family ``klut`` is known to equal
        (``ops.closed_form_family``), or ``FAMILY_UNKNOWN``.
      lut_facts: int32 ``[Gl]`` from ``lut_facts_call(klut, mbits)``, or
        None (unknown: the kernel checks the LUTs).

    Returns:
      float32 ``[D, B, M, N]`` with ``D = max(Ga, Gb, Gl)``, ``B = max(Ba, Bb)``.
    """
    designs = max(a.shape[0], b.shape[0], klut.shape[0])
    batch = max(a.shape[1], b.shape[1])
    shape = (designs, batch, a.shape[2], b.shape[3])
    if lut_facts is None:
        lut_facts = unknown_lut_facts(klut)
    return call_target(
        GEMM_TARGET,
        _result_type(shape, a),
        a,
        b,
        klut,
        lut_facts,
        mbits=mbits,
        family=np.int32(family),
    )


def multiply_call(a: jax.Array, b: jax.Array, klut: jax.Array, mbits: int) -> jax.Array:
    """Calls the ``approx_jax_multiply`` custom call.

    Args:
      a: float32 ``[Ga, n]``.
      b: float32 ``[Gb, n]``.
      klut: uint32 kernel-format LUTs ``[Gl, 4**mbits]``.
      mbits: mantissa width M.

    Returns:
      float32 ``[D, n]`` with ``D = max(Ga, Gb, Gl)``.
    """
    designs = max(a.shape[0], b.shape[0], klut.shape[0])
    shape = (designs, a.shape[1])
    return call_target(MULTIPLY_TARGET, _result_type(shape, a), a, b, klut, mbits=mbits)
