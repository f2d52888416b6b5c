"""``approximate``: run any JAX function with its products simulated.

The function is traced to a jaxpr once per call signature and the jaxpr is
evaluated again with every floating-point ``dot_general`` and
``conv_general_dilated`` replaced by :func:`approx_jax.nn.approx_dot_general`
and :func:`approx_jax.approx_conv`, every ``ragged_dot_general`` by
:func:`approx_ragged_dot_general` (made of the former), and, on request, every
elementwise ``mul`` by :func:`approx_jax.multiply`. Everything else is bound
unchanged. Control flow (``jit``, ``scan``, ``while``, ``cond``,
``checkpoint``) is rebuilt with the same ``lax`` functions around the
rewritten bodies, so the result can be jitted, differentiated (the simulated
ops' own VJPs) and vmapped over a stack of designs like any function written
with approx_jax ops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import re
import threading
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core

from approx_jax._src import conv as conv_lib
from approx_jax._src import ops
from approx_jax._src.nn import hooks

# Primitives whose products are simulated, by name (stable across jax versions).
_DOT = "dot_general"
_CONV = "conv_general_dilated"
_MUL = "mul"
# Grouped matmuls (mixture-of-experts layers): ``lax.ragged_dot`` binds
# ragged_dot_general; older jax versions had a ragged_dot primitive of
# lax.ragged_dot's layout.
_RAGGED_DOT = "ragged_dot_general"
_RAGGED_DOT_OLD = "ragged_dot"
# Call-like primitives whose body is evaluated in place (the boundary is dropped).
_INLINE_CALLS = ("jit", "pjit", "closed_call", "core_call")
# Primitives with a custom derivative rule: kept as they are unless their body
# computes products to simulate (then the body is evaluated and the rule dropped).
_CUSTOM_RULES = ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr")


# Primitives folded to concrete values when their inputs are literals or such
# values (never the function's inputs or closed-over constants), to recognise
# convolutions that only move data (see _is_selection_kernel). The folded
# values only decide; the program computes its own as before.
_STRUCTURAL = (
    "iota",
    "eq",
    "ne",
    "and",
    "or",
    "not",
    "add",
    "sub",
    "convert_element_type",
    "broadcast_in_dim",
    "reshape",
    "transpose",
    "squeeze",
    "expand_dims",
    "concatenate",
    "pad",
    "slice",
    "rev",
    "select_n",
)
_STRUCTURAL_MAX_SIZE = 1 << 20


def _is_selection_kernel(kernel, params) -> bool:
    """Whether a convolution with this concrete kernel only gathers its input.

    ``lax.conv_general_dilated_patches`` (``nn.ConvLocal``, patch extraction)
    is a convolution against a one-hot kernel built from ``iota``: every
    output feature copies one input element. That is data movement, not
    multiplications of the model (P(x, 1) != x on most approximate
    multipliers), so it stays native.
    """
    if kernel is None or kernel.ndim < 2:
        return False
    out_dim = params["dimension_numbers"].rhs_spec[0]
    per_output = np.moveaxis(kernel, out_dim, 0).reshape(kernel.shape[out_dim], -1)
    return bool(np.isin(per_output, (0, 1)).all() and ((per_output != 0).sum(axis=1) == 1).all())


# The name of the jit boundary that ``_trace`` puts around every
# ``jnp.einsum`` call: its inputs are the einsum's operands in the caller's
# order, which the dot_generals inside may not keep (see _swapped_dots).
_EINSUM_CALL = "approx_jax_einsum"
# A simulated op's own float32 products (backward="exact"): kept native.
_NATIVE_CALL = ops.NATIVE_CALL


def _float_operands(operands, result_dtype) -> list | None:
    """A product's two operands as floats, or None if it is not a float product.

    A float product has a floating-point operand and one that is floating
    point, integer or boolean (``dot_general(int32, bfloat16,
    preferred_element_type=float32)``, which ``jnp.dot`` / ``einsum`` emit
    for mixed inputs): the integer operand is converted to the product's
    float result dtype, as the native product computes it (else to the other
    operand's dtype). Complex and integer-only products are not float products.
    """
    kinds = [jax.numpy.result_type(x) for x in operands]
    floats = [jax.numpy.issubdtype(k, jax.numpy.floating) for k in kinds]
    plain = [
        f or jax.numpy.issubdtype(k, jax.numpy.integer) or k == jax.numpy.bool_
        for k, f in zip(kinds, floats, strict=True)
    ]
    if not any(floats) or not all(plain):
        return None
    if all(floats):
        return list(operands)
    target = result_dtype
    if not jax.numpy.issubdtype(target, jax.numpy.floating):
        target = kinds[floats.index(True)]
    return [x if f else x.astype(target) for x, f in zip(operands, floats, strict=True)]


# A name-stack segment of a lifted Flax transform: "vmap(Block_0)".
_TRANSFORM_SEGMENT = re.compile(r"^[A-Za-z_]\w*\((.*)\)$")


def module_path(path: str) -> str:
    """A name-stack path as the Flax module path the parameters are stored under.

    Lifted transforms decorate the name stack: ``nn.vmap`` gives
    ``"Model/vmap(Block_0)/Dense_0"`` and ``nn.scan`` / ``nn.RNN`` a method
    segment before the module's own (``"Model/Block_0.<lambda>/Block_0/Dense_0"``,
    ``".../LSTMCell_0.scan_fn/LSTMCell_0/ii"``). Both become
    ``"Model/Block_0/Dense_0"`` style paths. ``jnp.einsum``'s own scope (its
    spec, ``"attn/qk,kd->dq"``) is dropped.
    """
    out: list[str] = []
    previous_decorated = False
    for segment in _without_einsum_scopes(path).split("/"):
        clean = segment
        while match := _TRANSFORM_SEGMENT.match(clean):
            clean = match.group(1)
        clean = clean.split(".", 1)[0] or clean
        if not clean:  # a transform of the top level: "vmap()", "jvp()"
            continue
        if previous_decorated and out and out[-1] == clean:
            previous_decorated = clean != segment
            continue
        out.append(clean)
        previous_decorated = clean != segment
    return "/".join(out)


def _without_einsum_scopes(path: str) -> str:
    """``path`` without the scopes ``jnp.einsum`` names by its spec (``"ij,jk->ik"``)."""
    return "/".join(s for s in path.split("/") if "," not in s and "->" not in s)


def _path_matches(path: str, pattern: str) -> bool:
    """Whether ``pattern`` matches ``path`` or a trailing part of it at a ``/``.

    Tried on the raw name-stack path and on its :func:`module_path`, both
    without ``jnp.einsum``'s own scopes.
    """
    for candidate in dict.fromkeys((_without_einsum_scopes(path), module_path(path))):
        parts = candidate.split("/")
        if any(fnmatch.fnmatchcase("/".join(parts[i:]), pattern) for i in range(len(parts))):
            return True
    return False


class _PatternAssignment:
    """A mapping of name patterns as ``path -> Multiplier | None`` (first match wins).

    Records which patterns decided a product and which only matched products
    an earlier pattern had taken, so that :meth:`warn_unused` can point out
    entries that changed nothing: a misspelt layer name, a ``models.apply``
    kind (``"conv"``) taken for a pattern, an entry behind ``"*"``.
    """

    def __init__(self, multiplier: Mapping):
        self.rules = []
        for pattern, m in multiplier.items():
            if not isinstance(pattern, str):
                raise TypeError(
                    f"multiplier mapping keys must be name patterns (str), got {pattern!r}"
                )
            self.rules.append((pattern, ops.resolve_multiplier(m)))
        self.used: set[str] = set()
        self.shadowed: set[str] = set()
        self.paths: set[str] = set()  # product paths seen

    def __call__(self, path: str):
        matching = [(pattern, m) for pattern, m in self.rules if _path_matches(path, pattern)]
        self.paths.add(module_path(path) or path)
        if not matching:
            return None
        self.used.add(matching[0][0])
        self.shadowed.update(pattern for pattern, _ in matching[1:])
        return matching[0][1]

    def warn_unused(self) -> None:
        """Warns about patterns that decided no product of the traced function."""
        if not self.paths:  # nothing traced yet, or a function without products
            return
        unused = [pattern for pattern, _ in self.rules if pattern not in self.used]
        if not unused:
            return
        named = sorted(p for p in list(self.paths) if p)  # (a snapshot: other threads add)
        if named:
            shown = ", ".join(named[:8]) + (", ..." if len(named) > 8 else "")
            if "" in self.paths:
                shown += ", and products outside any named scope"
            where = f"the products here are at: {shown}"
        else:
            # Flax nnx modules (and plain functions) leave no name stack.
            where = (
                "no product here has a module path: Flax linen modules and "
                "jax.named_scope give products their paths, Flax nnx modules do "
                "not; wrap an nnx layer's call in `with jax.named_scope('conv1'):` "
                "to address it, or give approx_jax.nn layers or hooks their own multiplier"
            )
        notes = []
        for pattern in unused:
            why = (
                "comes after a pattern that takes its products"
                if (pattern in self.shadowed)
                else "matches no product"
            )
            notes.append(f"{pattern!r} {why}")
        it = "they change" if len(unused) > 1 else "it changes"
        warnings.warn(
            f"approximate: multiplier pattern {'; '.join(notes)}, so {it} nothing "
            f"(patterns match Flax module paths; {where})",
            UserWarning,
            stacklevel=3,
        )


def _assignment(multiplier) -> Callable:
    """``multiplier`` (one, or a mapping of name patterns) as ``path -> Multiplier | None``."""
    if isinstance(multiplier, Mapping):
        return _PatternAssignment(multiplier)
    m = ops.resolve_multiplier(multiplier)
    return lambda path: m


def _join(prefix: str, name_stack) -> str:
    name = str(name_stack)
    return f"{prefix}/{name}" if prefix and name else prefix or name


class _Rewriter:
    """Evaluates jaxprs with the selected products simulated."""

    def __init__(self, multiplier, backward: str, elementwise: bool):
        self.assign = _assignment(multiplier)
        self.backward = backward
        products = (_DOT, _CONV, _RAGGED_DOT, _RAGGED_DOT_OLD)
        self.targets = (*products, _MUL) if elementwise else products
        # Per thread: ids of the dot_general equations being evaluated whose
        # left operand is a later einsum operand than their right one (see
        # _swapped_dots). Threads calling one approximated function eagerly
        # evaluate the same cached inner jaxprs (same equation ids): a shared
        # set let one thread's exit drop the ids another was still using.
        self._per_thread = threading.local()
        # id(m) -> (m, m with the transposed LUT): built once per multiplier
        # (4**M entries compared and copied; m is kept so the id stays its).
        self.transposed: dict[int, tuple] = {}

    # -- helpers ------------------------------------------------------------

    @property
    def swapped(self) -> set[int]:
        """This thread's ids of swapped einsum dot_generals being evaluated."""
        ids = getattr(self._per_thread, "swapped", None)
        if ids is None:
            ids = self._per_thread.swapped = set()
        return ids

    def _transposed(self, m):
        """:func:`_transposed`, once per concrete multiplier (not for traced LUTs)."""
        if not isinstance(m.lut, np.ndarray):
            return _transposed(m)
        if id(m) not in self.transposed:
            self.transposed[id(m)] = (m, _transposed(m))
        return self.transposed[id(m)][1]

    def simulates(self, jaxpr, path: str) -> bool:
        """Whether ``jaxpr`` (or a jaxpr nested in it) has a product to simulate.

        ``path``: the name scope ``jaxpr`` runs in. Products that the
        assignment leaves native (no matching pattern, ``"fp32"``) do not
        count, so a primitive that cannot be rewritten (``custom_linear_solve``)
        is only an error where it holds a product to simulate.
        """
        for eqn in jaxpr.eqns:
            if self._kept_native(eqn):
                continue
            full = _join(path, eqn.source_info.name_stack)
            if self._simulated(eqn, full):
                return True
            if any(self.simulates(sub, full) for sub in _sub_jaxprs(eqn.params)):
                return True
        return False

    def _simulated(self, eqn, path: str) -> bool:
        """Whether the product ``eqn`` (at ``path``) is simulated."""
        return eqn.primitive.name in self.targets and self._design_at(path) is not None

    def _kept_native(self, eqn) -> bool:
        """Whether ``eqn`` is an approx_jax op's own float32 products (``approx_jax_native``)."""
        return eqn.primitive.name in _INLINE_CALLS and eqn.params.get("name") == _NATIVE_CALL

    def _design_at(self, path: str):
        """The multiplier simulating products at ``path``; None where they stay native."""
        m = self.assign(path)
        return None if m is None or m.is_exact else m

    def closed(self, closed_jaxpr, path: str) -> Callable:
        """A function of the jaxpr's inputs that evaluates it rewritten."""
        return lambda *args: self.eval(closed_jaxpr.jaxpr, closed_jaxpr.consts, args, path)

    # -- the interpreter ----------------------------------------------------

    def eval(self, jaxpr, consts, args, path: str = "") -> list:
        env: dict = {}

        def read(v):
            return v.val if isinstance(v, jex_core.Literal) else env[v]

        for v, x in zip(jaxpr.constvars, consts, strict=True):
            env[v] = x
        for v, x in zip(jaxpr.invars, args, strict=True):
            env[v] = x
        folded: dict = {}  # structural constants (_STRUCTURAL) as NumPy values

        def folded_value(v):
            return np.asarray(v.val) if isinstance(v, jex_core.Literal) else folded.get(v)

        for eqn in jaxpr.eqns:
            name, invals = eqn.primitive.name, [read(v) for v in eqn.invars]
            if name == _CONV and _is_selection_kernel(folded_value(eqn.invars[1]), eqn.params):
                outs = _bind(eqn, invals)
            else:
                outs = self.eqn(eqn, invals, path)
            if (
                name in _STRUCTURAL
                and not eqn.primitive.multiple_results
                and eqn.outvars[0].aval.size <= _STRUCTURAL_MAX_SIZE
            ):
                values = [folded_value(v) for v in eqn.invars]
                if all(v is not None for v in values):
                    with jax.ensure_compile_time_eval():
                        folded[eqn.outvars[0]] = np.asarray(
                            eqn.primitive.bind(*values, **eqn.params)
                        )
            if not eqn.primitive.multiple_results:
                outs = [outs]
            for v, x in zip(eqn.outvars, outs, strict=True):
                if not isinstance(v, jex_core.DropVar):
                    env[v] = x
        return [read(v) for v in jaxpr.outvars]

    def eqn(self, eqn, invals, path):
        name, params = eqn.primitive.name, eqn.params
        path = _join(path, eqn.source_info.name_stack)
        # (Operands first: a ragged dot's third operand is its integer group sizes.)
        floated = (
            _float_operands(invals[:2], eqn.outvars[0].aval.dtype) if name in self.targets else None
        )
        if floated is not None:
            # (The exact multiplier binds the equation as it is: same
            # precision, same bits as the original program.)
            m = self._design_at(path)
            if m is not None:
                if id(eqn) in self.swapped:
                    # P under the transposed LUT with the operands as emitted
                    # equals P with the einsum's operand order (SPEC's a is
                    # the earlier operand), forward and backward.
                    m = self._transposed(m)
                return getattr(self, "_" + name)(m, floated + list(invals[2:]), params)
        if self._kept_native(eqn):
            return _bind(eqn, invals)
        if name in _INLINE_CALLS:
            if not self.simulates(params["jaxpr"].jaxpr, path):
                # Kept as one call: evaluated op by op, XLA may round a fused
                # expression differently (jax 0.11's softplus, eagerly).
                return _bind(eqn, invals)
            if params.get("name") != _EINSUM_CALL:
                return self.closed(params["jaxpr"], path)(*invals)
            swapped = _swapped_dots(params["jaxpr"].jaxpr) - self.swapped
            self.swapped.update(swapped)
            try:
                return self.closed(params["jaxpr"], path)(*invals)
            finally:  # (equation ids are only unique while the jaxpr lives)
                self.swapped.difference_update(swapped)
        body = params.get("call_jaxpr", params.get("fun_jaxpr"))
        if name in _CUSTOM_RULES and body is not None and self.simulates(body.jaxpr, path):
            return self.closed(body, path)(*invals)
        if name == "remat2":
            return jax.checkpoint(
                lambda *a: self.eval(params["jaxpr"], (), a, path),
                prevent_cse=params["prevent_cse"],
                policy=params["policy"],
            )(*invals)
        if name == "scan" and self.simulates(params["jaxpr"].jaxpr, path):
            return self._scan(invals, params, path)
        if name == "while" and (
            self.simulates(params["body_jaxpr"].jaxpr, path)
            or self.simulates(params["cond_jaxpr"].jaxpr, path)
        ):
            return self._while(invals, params, path)
        if name == "cond" and any(self.simulates(b.jaxpr, path) for b in params["branches"]):
            index, *operands = invals
            return lax.switch(index, [self.closed(b, path) for b in params["branches"]], *operands)
        if any(self.simulates(sub, path) for sub in _sub_jaxprs(params)):
            raise NotImplementedError(
                f"approximate(): products inside a '{name}' primitive cannot be simulated "
                "(supported around them: jit, scan, while, cond, checkpoint, custom_jvp/vjp)"
            )
        return _bind(eqn, invals)

    # -- simulated products -------------------------------------------------

    def _dot_general(self, m, invals, params):
        lhs, rhs = invals
        return hooks.approx_dot_general(
            lhs,
            rhs,
            params["dimension_numbers"],
            m,
            self.backward,
            precision=params.get("precision"),
            preferred_element_type=params.get("preferred_element_type"),
        )

    def _conv_general_dilated(self, m, invals, params):
        lhs, rhs = invals
        # (batch_group_count > 1 is XLA's kernel gradient of a grouped
        # convolution, a gradient taken inside the function: lhs = input,
        # rhs = dy, so P(input, dy) as SPEC section 5 has it.)
        return conv_lib.approx_conv(
            lhs,
            rhs,
            m,
            params["window_strides"],
            params["padding"],
            params["lhs_dilation"],
            params["rhs_dilation"],
            params["dimension_numbers"],
            params["feature_group_count"],
            params["batch_group_count"],
            params.get("precision"),
            params.get("preferred_element_type"),
            backward=self.backward,
        )

    def _ragged_dot_general(self, m, invals, params):
        lhs, rhs, group_sizes = invals
        if params.get("group_offset") is not None:
            # (As lax's own implementation, which no CPU or GPU lowering passes.)
            raise NotImplementedError(
                "approximate(): ragged_dot_general with a group_offset is not simulated"
            )
        dot_dims, ragged, group = _ragged_dimensions(params)
        return approx_ragged_dot_general(
            lhs,
            rhs,
            group_sizes,
            dot_dims,
            ragged,
            group,
            m,
            self.backward,
            precision=params.get("precision"),
            preferred_element_type=params.get("preferred_element_type"),
        )

    _ragged_dot = _ragged_dot_general

    def _mul(self, m, invals, params):
        del params
        return ops.multiply(*invals, m, backward=self.backward)

    # -- control flow -------------------------------------------------------

    def _scan(self, invals, params, path):
        body = self.closed(params["jaxpr"], path)
        _, num_carry = _scan_counts(params)

        def step(consts, carry, x):
            outs = body(*consts, *carry, *x)
            return outs[:num_carry], outs[num_carry:]

        carry, ys = _rescan(invals, params, step)
        return [*carry, *ys]

    def _while(self, invals, params, path):
        nc, nb = params["cond_nconsts"], params["body_nconsts"]
        cond_consts, body_consts, init = invals[:nc], invals[nc : nc + nb], invals[nc + nb :]
        cond = self.closed(params["cond_jaxpr"], path)
        body = self.closed(params["body_jaxpr"], path)
        return lax.while_loop(
            lambda c: cond(*cond_consts, *c)[0], lambda c: body(*body_consts, *c), list(init)
        )


# --------------------------------------------------------------------------
# Ragged dots: the grouped matmuls of mixture-of-experts layers.

# lax.ragged_dot's layout ([m, k] x [g, k, n] -> [m, n]) as
# (dot_dimension_numbers, lhs_ragged_dimensions, rhs_group_dimensions).
_RAGGED_DOT_LAYOUT = ((((1,), (1,)), ((), ())), (0,), (0,))


def _ragged_dimensions(params) -> tuple:
    """A ragged dot equation's dimensions, as tuples in ``_RAGGED_DOT_LAYOUT``'s form."""
    numbers = params.get("ragged_dot_dimension_numbers")
    if numbers is None:  # the older ragged_dot primitive: lax.ragged_dot's layout
        return _RAGGED_DOT_LAYOUT
    (lc, rc), (lb, rb) = numbers.dot_dimension_numbers
    return (
        ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb))),
        tuple(numbers.lhs_ragged_dimensions),
        tuple(numbers.rhs_group_dimensions),
    )


def approx_ragged_dot_general(
    lhs,
    rhs,
    group_sizes,
    dot_dimension_numbers,
    lhs_ragged_dimensions,
    rhs_group_dimensions,
    multiplier,
    backward: str = "approx",
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """``lax.ragged_dot_general`` with simulated products (``lhs`` = operand ``a``).

    Built from :func:`approx_jax.nn.approx_dot_general` group by group, so
    every output is bit for bit what the simulated dense product of the same
    operands gives (its gradients, ``vmap`` over a design stack and ``jit``
    are those of the dense op). The group of a position along the ragged
    dimension comes from ``group_sizes`` (``[g]``, or ``[prefix..., g]``
    with lax's prefix dimensions) as in lax: contiguous groups, in order.
    lax's three modes:

    * ragged non-contracting dimension (``lax.ragged_dot``: ``[m, k] x [g,
      k, n] -> [m, n]``, and the lhs gradient of one): an lhs row in group
      ``i`` gets the dense product with ``rhs`` group ``i`` (the same sums
      as ``approx_dot`` of the whole ``lhs`` with it); rows past
      ``sum(group_sizes)`` are zeros, as in lax.
    * ragged contracting dimension (the rhs gradient of ``lax.ragged_dot``:
      ``[m, k] x [m, n] -> [g, k, n]``): output ``i`` is the dense product
      with both operands zeroed outside group ``i`` (lax's own
      definition; summing the zero products leaves the group's sums as
      they are while K < 4096, where the kernels do not split K). The rhs
      gradient of the non-contracting mode, taken outside, is such a sum
      too.
    * ragged batch dimension: lax's definition is the dense batched product
      (the group sizes do not enter it), which this is.

    Operands outside a group are zeroed before they are multiplied, so an
    Inf in one expert's weights or one group's rows gives no ``0 * Inf``
    NaN in another group's outputs or gradients (as XLA's ragged dot
    instruction, which never multiplies them; lax's CPU lowering, a dense
    product of zero-padded groups, does).

    Cost: ``g`` dense products of the full operands (``g`` times the
    products of the ragged dot); fine for the handful of experts of a
    simulated layer, costly for hundreds.

    Args:
      lhs: floating array (operand ``a`` of every product).
      rhs: floating array (operand ``b``).
      group_sizes: integer array ``[..., g]``.
      dot_dimension_numbers: ``((lhs_contract, rhs_contract), (lhs_batch,
        rhs_batch))`` as in ``lax.RaggedDotDimensionNumbers``.
      lhs_ragged_dimensions: the one ragged dimension of ``lhs``.
      rhs_group_dimensions: ``rhs``'s group dimension (non-contracting
        mode only; empty otherwise).
      multiplier: a single ``Multiplier`` (not exact, not a stack: vmap for
        those, as :func:`approximate` does).
      backward: ``"approx"`` or ``"exact"``.
      precision: passed on to the dense products.
      preferred_element_type: result dtype, as for ``lax.ragged_dot_general``.

    Returns:
      ``lax.ragged_dot_general``'s result (a leading group axis of size
      ``g`` in the ragged contracting mode).
    """
    (lc, rc), (lb, rb) = (
        tuple(tuple(int(d) for d in dims) for dims in pair) for pair in dot_dimension_numbers
    )
    if len(lhs_ragged_dimensions) != 1:
        raise ValueError(
            "ragged_dot_general takes exactly one lhs ragged dimension, got "
            f"{lhs_ragged_dimensions}"
        )
    ragged = int(lhs_ragged_dimensions[0])
    dot = functools.partial(
        hooks.approx_dot_general,
        multiplier=multiplier,
        backward=backward,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    if ragged in lb:
        return dot(lhs, rhs, ((lc, rc), (lb, rb)))
    lf = [d for d in range(lhs.ndim) if d not in lc and d not in lb]
    contracting = ragged in lc
    # The lhs dimensions group_sizes is indexed by (lax's prefix dimensions),
    # then the ragged one.
    lhs_axes = [*lb, *(lc[: lc.index(ragged)] if contracting else lf[: lf.index(ragged)]), ragged]
    group_of = _group_of(group_sizes, [lhs.shape[d] for d in lhs_axes])
    num_groups = group_sizes.shape[-1]

    def lhs_in(i):  # lhs zeroed outside group i
        return jnp.where(_placed(group_of == i, lhs_axes, lhs.shape), lhs, 0)

    if contracting:
        # rhs's dimensions paired with lhs_axes.
        rhs_axes = [rb[lb.index(d)] if d in lb else rc[lc.index(d)] for d in lhs_axes]
        outs = [
            dot(
                lhs_in(i),
                jnp.where(_placed(group_of == i, rhs_axes, rhs.shape), rhs, 0),
                ((lc, rc), (lb, rb)),
            )
            for i in range(num_groups)
        ]
        if not outs:
            return _no_groups(lhs, rhs, ((lc, rc), (lb, rb)), preferred_element_type, (0,))
        return jnp.stack(outs)
    (gd,) = (int(d) for d in rhs_group_dimensions)
    # rhs's dimensions once its group dimension is indexed away.
    dims = ((lc, tuple(d - (d > gd) for d in rc)), (lb, tuple(d - (d > gd) for d in rb)))
    # Where lhs_axes land in dot_general's output (batch, lhs free, rhs free).
    out_axes = [lb.index(d) if d in lb else len(lb) + lf.index(d) for d in lhs_axes]
    out = None
    for i in range(num_groups):
        out_i = dot(lhs_in(i), lax.index_in_dim(rhs, i, gd, keepdims=False), dims)
        rows = _placed(group_of == i, out_axes, out_i.shape)
        out = jnp.where(rows, out_i, 0 if out is None else out)
    if out is None:
        rhs_one = jax.ShapeDtypeStruct(rhs.shape[:gd] + rhs.shape[gd + 1 :], rhs.dtype)
        return _no_groups(lhs, rhs_one, dims, preferred_element_type, ())
    return out


def _group_of(group_sizes, shape) -> jax.Array:
    """The group of every position of ``shape`` (prefix dimensions, then the ragged one).

    ``g`` (the group count) past the last group. ``group_sizes``: ``[g]``
    (the same groups for every prefix position) or ``[*shape[:-1], g]``.
    """
    ends = jnp.cumsum(group_sizes, axis=-1)
    ends = jnp.broadcast_to(ends, (*shape[:-1], ends.shape[-1]))
    position = jnp.arange(shape[-1], dtype=ends.dtype)
    # Position r is in group i when ends[i - 1] <= r < ends[i]: i group ends lie at or before it.
    return jnp.sum(position[:, None] >= ends[..., None, :], axis=-1)


def _placed(x, axes, shape) -> jax.Array:
    """``x``, whose dimension j is dimension ``axes[j]`` of ``shape``, broadcast to ``shape``."""
    order = np.argsort(axes)
    return lax.broadcast_in_dim(jnp.transpose(x, order), shape, tuple(int(axes[j]) for j in order))


def _no_groups(lhs, rhs, dims, preferred_element_type, lead) -> jax.Array:
    """The result of a ragged dot with no groups (no products): zeros, ``lead`` + dot_general's."""
    out = jax.eval_shape(
        functools.partial(
            lax.dot_general, dimension_numbers=dims, preferred_element_type=preferred_element_type
        ),
        lhs,
        rhs,
    )
    return jnp.zeros((*lead, *out.shape), out.dtype)


def _bind(eqn, invals):
    """The equation's primitive applied to ``invals``, unchanged."""
    bind = eqn.primitive.get_bind_params(eqn.params)
    # (jax 0.10: the parameters; older versions: (subfuns, parameters).)
    subfuns, bind = bind if isinstance(bind, tuple) else ((), bind)
    ctx = getattr(eqn, "ctx", None)
    with ctx.manager if ctx is not None else contextlib.nullcontext():
        return eqn.primitive.bind(*subfuns, *invals, **bind)


def _rescan(invals, params, step):
    """A scan equation's operands run through ``lax.scan`` with its options.

    ``step(consts, carry, x)`` returns ``(new_carry, y)``; returns ``(carry, ys)``.
    """
    num_consts, num_carry = _scan_counts(params)
    consts = invals[:num_consts]
    init = invals[num_consts : num_consts + num_carry]
    xs = invals[num_consts + num_carry :]
    return lax.scan(
        lambda carry, x: step(consts, carry, x),
        list(init),
        list(xs),
        length=params["length"],
        reverse=params["reverse"],
        unroll=params["unroll"],
    )


def _scan_counts(params) -> tuple[int, int]:
    """``(num_consts, num_carry)`` of a scan equation.

    jax 0.10 stores the counts; jax 0.11 describes the operands as a flat tree
    ``ft_in`` of ``(consts, carry, xs)`` instead.
    """
    if "num_carry" in params:
        return params["num_consts"], params["num_carry"]
    consts, carry, _ = params["ft_in"].unpack()
    return len(list(consts.vals)), len(list(carry.vals))


def _sub_jaxprs(params) -> list:
    """The (open) jaxprs held in an equation's parameters."""
    found = []
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jex_core.ClosedJaxpr):
                found.append(item.jaxpr)
            elif isinstance(item, jex_core.Jaxpr):
                found.append(item)
    return found


def _swapped_dots(jaxpr, origins=None) -> set[int]:
    """ids of the dot_general equations of an einsum whose operands come swapped.

    ``jnp.einsum`` may emit ``dot_general(y, x)`` for ``einsum(spec, x, y)``
    (it saves a transpose: Flax attention's ``weights x value`` becomes
    ``dot_general(value, weights)``). SPEC's operand ``a`` is the einsum's
    earlier operand, an intermediate result standing for its earliest
    operand: a dot_general is swapped when its right operand derives from an
    earlier einsum operand than its left one. ``origins`` maps the jaxpr's
    input variables to the einsum operand indices they derive from.
    """
    origin: dict = {}
    for i, v in enumerate(jaxpr.invars):
        origin[v] = frozenset({i}) if origins is None else origins[i]
    found: set[int] = set()
    for eqn in jaxpr.eqns:
        ins = [
            frozenset() if isinstance(v, jex_core.Literal) else origin.get(v, frozenset())
            for v in eqn.invars
        ]
        if eqn.primitive.name == _DOT:
            left, right = ins
            if left and right and min(right) < min(left):
                found.add(id(eqn))
        elif eqn.primitive.name in _INLINE_CALLS:
            found |= _swapped_dots(eqn.params["jaxpr"].jaxpr, ins)
        union = frozenset().union(*ins)
        for v in eqn.outvars:
            origin[v] = union
    return found


def _transposed(m):
    """``m`` with its operands swapped: entry ``(v, u)`` holds entry ``(u, v)``.

    ``P`` under it of ``(b, a)`` is ``P`` under ``m`` of ``(a, b)``, bit for
    bit (SPEC section 2 is symmetric apart from the LUT address). A LUT
    known to be symmetric (every built-in family) is returned as it is.
    """
    lut = m.lut
    if isinstance(lut, np.ndarray):  # NumPy, not jnp: stays concrete inside a trace
        side = 1 << m.mbits
        swapped = np.swapaxes(lut.reshape(lut.shape[:-1] + (side, side)), -1, -2).reshape(lut.shape)
        if np.array_equal(swapped, lut):
            return m
        return dataclasses.replace(m, lut=np.ascontiguousarray(swapped))
    return dataclasses.replace(m, lut=ops._transposed_lut(jax.numpy.asarray(lut), m.mbits))


_einsum_patch_lock = threading.Lock()
# Threads tracing under _einsum_calls_marked -> nesting depth, and the patch
# installed while there is any (home module, attribute, the original einsum).
_einsum_tracing_threads: dict[int, int] = {}
_einsum_patch: dict[str, Any] = {"home": None, "name": None, "original": None}


def _einsum_entry_points():
    """``(module, attribute, marked_replacement_factory)`` of what to patch.

    Every ``jnp.einsum`` call, however the function was bound (``nnx.Einsum``
    binds it as a default argument, ``jax.nn`` imports it privately), runs
    the module-level ``_einsum(operands, contractions, ...)`` of
    ``jax._src.numpy.einsum``, looked up at call time with the operands in
    the caller's order: that is patched where it exists. Otherwise (another
    jax layout) the public ``jax.numpy.einsum`` is.
    """
    try:
        from jax._src.numpy import einsum as einsum_module  # noqa: PLC0415 - private

        impl = einsum_module._einsum
        if callable(impl):

            def marked(original):
                def impl_marked(operands, *static, **kw):
                    if not isinstance(operands, (list, tuple)):  # another signature
                        return original(operands, *static, **kw)

                    return _einsum_call(lambda *ops: original(list(ops), *static, **kw), operands)

                return impl_marked

            return einsum_module, "_einsum", marked
    except (ImportError, AttributeError):
        pass

    def marked_public(original):
        def einsum(*args, **kwargs):
            operand_at = [
                i
                for i, a in enumerate(args)
                if not isinstance(a, (str, list, tuple)) and not _is_sublist(a)
            ]

            def call(*operands):
                full = list(args)
                for i, x in zip(operand_at, operands, strict=True):
                    full[i] = x
                return original(*full, **kwargs)

            return _einsum_call(call, [args[i] for i in operand_at])

        return functools.wraps(original)(einsum)

    return jax.numpy, "einsum", marked_public


def _einsum_call(fn, operands):
    """``fn(*operands)`` as a jit named ``_EINSUM_CALL`` (the marker of an einsum)."""

    def call(*ops):
        return fn(*ops)

    call.__name__ = call.__qualname__ = _EINSUM_CALL
    return jax.jit(call)(*operands)


def _is_sublist(a) -> bool:
    """An interleaved-form subscript list given as a NumPy integer array."""
    return isinstance(a, np.ndarray) and a.ndim == 1 and np.issubdtype(a.dtype, np.integer)


@contextlib.contextmanager
def _einsum_calls_marked():
    """While tracing, every einsum is a jit named ``_EINSUM_CALL``.

    Its jaxpr then keeps the einsum's operands in the caller's order, for
    :func:`_swapped_dots`.
    """
    # The lock guards installing and removing the patch only, not the trace:
    # held across the user's code, a traced function that waited on another
    # thread's approx_jax einsum or approximate() call blocked for ever, and
    # every trace in the process ran one at a time. The patch stays while any
    # thread traces; its dispatch marks the einsums of tracing threads only.
    thread = threading.get_ident()
    with _einsum_patch_lock:
        if thread in _einsum_tracing_threads:  # a nested trace in this thread
            _einsum_tracing_threads[thread] += 1
            outermost = False
        else:
            outermost = True
            if _einsum_patch["original"] is None:
                home, name, make_marked = _einsum_entry_points()
                original = getattr(home, name)
                marked = make_marked(original)

                def dispatch(*args, **kwargs):
                    if threading.get_ident() in _einsum_tracing_threads:
                        return marked(*args, **kwargs)
                    return original(*args, **kwargs)  # another thread's einsum

                dispatch._approx_jax_marks = True
                _einsum_patch.update(home=home, name=name, original=original)
                setattr(home, name, dispatch)
            _einsum_tracing_threads[thread] = 1
    try:
        if outermost:
            with _fresh_traces():
                yield
        else:
            yield
    finally:
        with _einsum_patch_lock:
            _einsum_tracing_threads[thread] -= 1
            if _einsum_tracing_threads[thread] == 0:
                del _einsum_tracing_threads[thread]
            if not _einsum_tracing_threads and _einsum_patch["original"] is not None:
                setattr(_einsum_patch["home"], _einsum_patch["name"], _einsum_patch["original"])
                _einsum_patch.update(home=None, name=None, original=None)


@contextlib.contextmanager
def _fresh_traces():
    """Makes nested ``jax.jit`` functions retrace instead of reusing cached jaxprs.

    A jitted function that was traced before (natively, say for an fp32
    baseline) would otherwise bring back its cached jaxpr, whose einsum
    calls are not marked. JAX keys its trace caches on the configuration's
    trace context; this changes one entry of it that has no effect on the
    program: the regex that shortens source file names in HLO location
    metadata, extended by an alternative that matches nothing.
    """
    never = "(?!)approx_jax_einsum_trace"
    try:
        from jax._src import config as jax_config  # noqa: PLC0415 - private, may move

        state = jax_config.hlo_source_file_canonicalization_regex
        current = state.value
        fresh = state(never if current is None else f"{current}|{never}")
    except Exception:  # noqa: BLE001 - another jax layout: cached traces stay cached
        fresh = contextlib.nullcontext()
    with fresh:
        yield


def _is_dynamic(leaf) -> bool:
    """Array leaves are traced; everything else (flags, names, shapes) stays static."""
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


def _variables_by_leaf(tree) -> dict[int, Any]:
    """Leaf index (in ``tree_flatten(tree)``'s order) -> the flax nnx Variable whose value it is.

    Only Variables whose value is one leaf (an array) are listed.
    """
    try:
        from flax import nnx  # noqa: PLC0415 - optional here
    except ImportError:  # pragma: no cover - flax is a dependency
        return {}
    found, index = {}, 0
    is_variable = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    for unit in jax.tree_util.tree_leaves(tree, is_leaf=is_variable):
        width = len(jax.tree_util.tree_leaves(unit)) if is_variable(unit) else 1
        if width == 1 and is_variable(unit):
            found[index] = unit
        index += width
    return found


# Set while a design stack's sweep traces ``fun`` once per design under vmap:
# state written into nnx Variables there has a design axis and no single
# value to write back.
_sweeping = threading.local()


def _trace(fun: Callable, args, kwargs):
    """``fun(*args, **kwargs)`` as a jaxpr of its array leaves.

    State that ``fun`` writes into flax nnx Variables of its arguments (a
    BatchNorm's statistics, an Rngs count, an optimizer step) is returned by
    the jaxpr too and written back into the caller's Variables, as
    ``nnx.jit`` does: the arguments are rebuilt from their leaves for the
    trace, so without this the updates would be lost.

    Returns:
      ``(closed_jaxpr, array_leaves, rebuild)``: ``rebuild(outs)`` puts the
      jaxpr's outputs back into ``fun``'s output structure, together with the
      output leaves that are not arrays (a name, a flag), returned as they
      are, and writes the state outputs into the arguments' Variables.
    """
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    dynamic = [_is_dynamic(leaf) for leaf in leaves]
    variables = {i: v for i, v in _variables_by_leaf((args, kwargs)).items() if dynamic[i]}
    out_info = {}

    def flat_fun(*dyn):
        it = iter(dyn)
        full = [next(it) if d else leaf for leaf, d in zip(leaves, dynamic, strict=True)]
        a, kw = jax.tree_util.tree_unflatten(treedef, full)
        out_leaves, out_info["tree"] = jax.tree_util.tree_flatten(fun(*a, **kw))
        out_info["static"] = [
            None if isinstance(x, jax.core.Tracer) or _is_dynamic(x) else x for x in out_leaves
        ]
        after, after_def = jax.tree_util.tree_flatten((a, kw))
        out_info["written"] = []
        if after_def == treedef:
            out_info["written"] = [i for i in variables if after[i] is not full[i]]
        elif variables:
            warnings.warn(
                "approximate(): the function changed the structure of its flax nnx arguments "
                "(a plain attribute set, a Variable added or removed); what it wrote into "
                "their Variables is not written back. Use nnx.split / nnx.merge and return the "
                "new state instead.",
                stacklevel=4,
            )
        outs = [x for x, st in zip(out_leaves, out_info["static"], strict=True) if st is None]
        return outs + [after[i] for i in out_info["written"]]

    dyn_leaves = [leaf for leaf, d in zip(leaves, dynamic, strict=True) if d]
    with _einsum_calls_marked():
        closed = jax.make_jaxpr(flat_fun)(*dyn_leaves)

    def rebuild(outs):
        written = out_info["written"]
        if written and getattr(_sweeping, "active", False):
            raise NotImplementedError(
                "approximate() with a design stack: the function writes state into flax nnx "
                "Variables of its arguments, which would get a design axis; return the state "
                "instead (nnx.split / nnx.merge), or run one design at a time"
            )
        num_outs = len(outs) - len(written)
        outs, state = list(outs[:num_outs]), outs[num_outs:]
        for i, value in zip(written, state, strict=True):
            variable = variables[i]
            if hasattr(variable, "set_value"):  # flax >= 0.12 (the .value setter is deprecated)
                variable.set_value(value)
            else:  # pragma: no cover - older flax
                variable.value = value
        it = iter(outs)
        full = [next(it) if st is None else st for st in out_info["static"]]
        return jax.tree_util.tree_unflatten(out_info["tree"], full)

    return closed, dyn_leaves, rebuild


def approximate(
    fun: Callable, multiplier: Any, *, backward: str = "approx", elementwise: bool = False
) -> Callable:
    """Wraps any JAX function so that its matrix products and convolutions are simulated.

    The function is traced and every floating-point ``lax.dot_general``
    (``@``, ``jnp.dot``/``matmul``/``einsum``, Flax ``Dense``/attention) and
    ``lax.conv_general_dilated`` (Flax ``Conv``) in it, including inside
    nested ``jit``, ``scan``, ``while_loop``, ``cond``, ``checkpoint`` and
    custom-derivative functions, runs on the approximate multiplier instead
    (``a`` = the left operand/input, ``b`` = the right operand/kernel, as
    :func:`approx_jax.nn.approx_dot_general` and
    :func:`approx_jax.approx_conv`). For ``jnp.einsum`` ``a`` is the earlier
    einsum operand, even where einsum emits ``dot_general(y, x)`` to save a
    transpose (Flax attention's ``weights x value``): the trace marks einsum
    calls (also through ``jax.nn`` and ``nnx.Einsum``, and in jitted
    functions traced before), and such a product runs under the transposed
    LUT, which gives ``P(x, y)`` bit for bit (this matters only for a
    multiplier whose LUT is not symmetric). ``lax.ragged_dot`` /
    ``ragged_dot_general`` (the grouped matmul of mixture-of-experts layers)
    is simulated too, in each of lax's modes: every output is bit for bit
    the simulated dense product of its group's operands (computed as ``g``
    dense products of the whole operands, ``g`` the number of groups: ``g``
    times the work; see ``approx_jax.ragged_dot``). An integer
    operand of a float product is converted to float first, as natively;
    complex products stay native (SPEC covers float32). Nothing else changes.
    No model code needs to be edited: a pretrained model from any library is
    evaluated, or fine-tuned, on the simulated hardware as it is.

    Differentiate the *approximated* function (``jax.grad(approximate(f, m))``):
    the simulated ops then supply SPEC section 5's backward products. A
    gradient computed *inside* ``fun`` is part of the traced program, so its
    products are simulated like any other, in the operand order of JAX's
    transpose rules: a dense layer's (``@``, ``dot``) input gradient is
    ``P(dy, w)`` as in SPEC, but its weight gradient comes as ``P(dy, x)``,
    the reverse of SPEC's ``P(x, dy)``; an einsum's (Flax attention's) the
    other way round, input gradients ``P(w, dy)`` and weight gradients
    ``P(x, dy)``; a convolution's ``P(dy, w)`` and ``P(x, dy)`` (a grouped
    one's kernel gradient as XLA's batch-group convolution, which is
    simulated too); a ragged dot's ``P(dy, w)`` and ``P(x, dy)``, as SPEC
    (the latter a ragged dot contracting the groups' rows). The order
    matters only for a LUT that is not symmetric; differentiating the
    approximated function gives SPEC's order everywhere.
    A ``custom_jvp`` / ``custom_vjp`` function whose primal computes
    simulated products is evaluated as its primal: its custom rule (a
    straight-through estimator, say) is dropped and the
    simulated ops supply the gradients. Otherwise the function is kept with
    its rule, whose products stay native. approx_jax's own ops inside ``fun``
    keep their designs, and their ``backward="exact"`` products stay float32
    even when the gradient is taken inside ``fun``; an op given ``"fp32"``
    computes native products, which are simulated like any other (so a model
    of ``approx_jax.nn`` layers left at their default runs on ``multiplier``).
    Primitives that cannot be rewritten
    (``custom_linear_solve``: ``jnp.linalg.solve``) run natively, and are an
    error only if a product inside them is to be simulated.

    Args:
      fun: The function, e.g. ``model.apply`` of a Flax linen model or any
        function of arrays. Array arguments (``jax.Array``, NumPy arrays) are
        traced; other leaves of the arguments (flags, strings, ints) are
        passed through unchanged.
      multiplier: a ``Multiplier`` or a name such as ``"mbm7"``; a stack
        (``multipliers.stack``) runs the function once per design, vmapped
        (one custom call per product for all designs), and gives every output
        a leading design axis; or, per layer, a mapping from name patterns to
        multipliers, e.g. ``{"Conv_0": "fp32", "Dense_*": "mitchell5", "*":
        "mbm7"}``. A product's name is the Flax module path it was computed
        in (``"CNN/Conv_0"``, from JAX's name stack: linen modules and
        ``jax.named_scope``); a pattern (``fnmatch``) matches the whole path
        or a trailing part of it at a ``/``. The first matching entry wins;
        a product no pattern matches keeps its native arithmetic. Entries
        may be stacks (of one size): each design of the sweep takes design d
        of every stacked entry.
      backward: ``"approx"`` or ``"exact"`` (as the simulated ops).
      elementwise: also simulate elementwise floating-point multiplications
        (``lax.mul``, i.e. ``*`` and ``jnp.multiply``: scalings, gates,
        attention scaling), which hardware with one kind of multiplier would
        compute on it too (``jnp.outer`` is such a ``mul``). ``x ** 2`` and
        ``jnp.square`` are other primitives (``integer_pow``, ``square``)
        and stay native: write ``x * x`` to simulate a square. Off by
        default, as in ApproxTrain (matrix products and convolutions only).

    Returns:
      A function with ``fun``'s signature and output structure.

    Example:
      >>> model = flax.linen.Sequential(
      ...     [nn.Dense(128), nn.relu, nn.Dense(64), nn.relu, nn.Dense(10)])
      >>> params = model.init(jax.random.PRNGKey(0), x)
      >>> logits = jax.jit(approx_jax.approximate(model.apply, "mbm7"))(params, x)
      >>> # first and last layers exact, the rest on the approximate unit:
      >>> exact_ends = {"layers_0": "fp32", "layers_4": "fp32", "*": "mbm7"}
      >>> apply = approx_jax.approximate(model.apply, exact_ends)
    """
    ops.check_backward(backward)
    # Names resolved once (a C model's name compiles or preprocesses it).
    if isinstance(multiplier, Mapping):
        multiplier = {k: ops.resolve_multiplier(v) for k, v in multiplier.items()}
    else:
        multiplier = ops.resolve_multiplier(multiplier)
    swept = _design_sweep(fun, multiplier, backward, elementwise)
    if swept is not None:
        return swept
    rewriter = _Rewriter(multiplier, backward, bool(elementwise))

    @functools.wraps(fun)
    def wrapped(*args, **kwargs):
        closed, dyn_leaves, rebuild = _trace(fun, args, kwargs)
        out = rebuild(rewriter.eval(closed.jaxpr, closed.consts, dyn_leaves))
        if isinstance(rewriter.assign, _PatternAssignment):
            rewriter.assign.warn_unused()
        return out

    return wrapped


def _design_sweep(fun, multiplier, backward, elementwise) -> Callable | None:
    """``fun`` approximated and vmapped over the designs of the stacks in ``multiplier``.

    ``multiplier`` is a resolved ``Multiplier`` or a mapping of them. None
    when no entry is a stack. Run design by design, a stack would give
    every simulated op a design axis that the model's other operations (a bias
    add, a batch norm) do not expect; vmapped, the whole function runs once
    per design (still one custom call per product) and every output gets the
    leading design axis.
    """
    if isinstance(multiplier, Mapping):
        keys, entries = list(multiplier), list(multiplier.values())
    else:
        keys, entries = None, [multiplier]
    sizes = {m.num_designs for m in entries if m.is_stack}
    if not sizes:
        return None
    if len(sizes) > 1:
        raise ValueError(
            "the stacks in the multiplier mapping have different numbers of designs: "
            f"{sorted(sizes)}"
        )
    in_axes = [0 if m.is_stack else None for m in entries]

    @functools.wraps(fun)
    def swept(*args, **kwargs):
        # Non-array outputs (a name, an int) come back as they are, as without
        # a stack: vmap would reject a str and give an int a design axis.
        static: dict = {}

        def one_design(designs):
            # A list, not the mapping: a dict pytree would come back in sorted
            # key order, and the first matching pattern wins.
            chosen = designs[0] if keys is None else dict(zip(keys, designs, strict=True))
            out = approximate(fun, chosen, backward=backward, elementwise=elementwise)(
                *args, **kwargs
            )
            leaves, static["tree"] = jax.tree.flatten(out)
            static["is_array"] = [isinstance(x, jax.Array | np.ndarray) for x in leaves]
            static["others"] = [x for x in leaves if not isinstance(x, jax.Array | np.ndarray)]
            return [x for x in leaves if isinstance(x, jax.Array | np.ndarray)]

        outer, _sweeping.active = getattr(_sweeping, "active", False), True
        try:
            arrays = iter(jax.vmap(one_design, in_axes=(in_axes,))(entries))
        finally:
            _sweeping.active = outer
        others = iter(static["others"])
        leaves = [next(arrays) if a else next(others) for a in static["is_array"]]
        return jax.tree.unflatten(static["tree"], leaves)

    return swept


# --------------------------------------------------------------------------
# Operand samples: the pairs each product of a real run multiplies.


class _Recorder(_Rewriter):
    """Evaluates a jaxpr natively, sampling the operand pairs of every product."""

    def __init__(self, num: int, seed: int):
        super().__init__("fp32", "approx", False)
        self.num = num
        self.rng = np.random.default_rng(seed)
        self.samples: dict = {}

    def eqn(self, eqn, invals, path):
        name = eqn.primitive.name
        # (Operands first: a ragged dot's third operand is its integer group sizes.)
        floated = (
            _float_operands(invals[:2], eqn.outvars[0].aval.dtype) if name in self.targets else None
        )
        if floated is not None:
            pairs = getattr(self, "_sample_" + name)(eqn, *floated, *invals[2:])
            if pairs is not None and id(eqn) in self.swapped:  # an einsum's: a is rhs
                pairs = pairs[::-1]
            if pairs is not None:
                self._record(module_path(_join(path, eqn.source_info.name_stack)) or name, pairs)
            return _bind(eqn, invals)
        if name == "remat2":  # no rematerialisation needed to read values
            full = _join(path, eqn.source_info.name_stack)
            return self.eval(eqn.params["jaxpr"], (), invals, full)
        if name in _INLINE_CALLS or name in _CUSTOM_RULES:
            return super().eqn(eqn, invals, path)
        full = _join(path, eqn.source_info.name_stack)
        if name == "scan" and self.simulates(eqn.params["jaxpr"].jaxpr, full):
            return self._scan_sampled(eqn, invals, full)
        # Products inside while loops and branches run an unknown number of
        # times / only when taken: not sampled.
        return _bind(eqn, invals)

    def _simulated(self, eqn, path: str) -> bool:
        del path  # every product is sampled, whatever the assignment
        return eqn.primitive.name in self.targets

    def _kept_native(self, eqn) -> bool:
        del eqn  # products are sampled wherever they are
        return False

    def _record(self, full: str, pairs) -> None:
        key, count = full, 1
        while key in self.samples:  # a layer applied again
            count += 1
            key = f"{full}#{count}"
        self.samples[key] = pairs

    def _scan_sampled(self, eqn, invals, path):
        """The scan rebuilt with each iteration's draws as extra outputs (RNN cells)."""
        body, (_, num_carry) = eqn.params["jaxpr"], _scan_counts(eqn.params)
        inner = _Recorder(self.num, 0)
        inner.rng = self.rng  # the same stream of draws
        keys: list = []

        def step(consts, carry, x):
            inner.samples = {}
            outs = inner.eval(body.jaxpr, body.consts, [*consts, *carry, *x], path)
            keys[:] = list(inner.samples)
            return outs[:num_carry], (outs[num_carry:], [inner.samples[k] for k in keys])

        carry, (ys, draws) = _rescan(invals, eqn.params, step)
        # Every iteration drew at the same positions; keep `num` of all the
        # iterations' pairs (different values: the carry and inputs change).
        for key, arrays in zip(keys, draws, strict=True):
            pick = self._indices(arrays[0].size)
            self._record(key, tuple(x.reshape(-1)[pick] for x in arrays))
        return [*carry, *ys]

    def _indices(self, size: int):
        return self.rng.integers(0, size, self.num)

    def _sample_dot_general(self, eqn, lhs, rhs):
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        if lhs.size == 0 or rhs.size == 0:
            return None
        li, ri = [None] * lhs.ndim, [None] * rhs.ndim
        for dl, dr in zip((*lb, *lc), (*rb, *rc), strict=True):  # shared indices
            li[dl] = ri[dr] = self._indices(lhs.shape[dl])
        for idx, x in ((li, lhs), (ri, rhs)):
            for d in range(x.ndim):
                if idx[d] is None:  # free dimensions: any pair
                    idx[d] = self._indices(x.shape[d])
        return lhs[tuple(li)], rhs[tuple(ri)]

    def _sample_conv_general_dilated(self, eqn, lhs, rhs):
        p = eqn.params
        if lhs.size == 0 or rhs.size == 0:
            return None
        dn = p["dimension_numbers"]
        out_shape = eqn.outvars[0].aval.shape
        groups = p["feature_group_count"]
        batch_groups = p["batch_group_count"]
        n_out = lhs.shape[dn.lhs_spec[0]] // batch_groups
        n = self._indices(n_out)
        o = self._indices(rhs.shape[dn.rhs_spec[0]])
        i = self._indices(rhs.shape[dn.rhs_spec[1]])
        # Batch groups: output-feature group b reads input samples
        # [b * n_out, (b + 1) * n_out), n_out the output's batch size.
        n = n + (o // (rhs.shape[dn.rhs_spec[0]] // batch_groups)) * n_out
        per_group_out = rhs.shape[dn.rhs_spec[0]] // groups
        c = (o // per_group_out) * rhs.shape[dn.rhs_spec[1]] + i  # input channel of the pair
        valid = np.ones(self.num, bool)
        x_pos, taps = [], []
        for d in range(len(dn.lhs_spec) - 2):
            size = lhs.shape[dn.lhs_spec[2 + d]]
            pos = self._indices(out_shape[dn.out_spec[2 + d]])
            tap = self._indices(rhs.shape[dn.rhs_spec[2 + d]])
            lhs_dil = p["lhs_dilation"][d]
            # Position in the padded, lhs-dilated input; padding and dilation
            # holes hold no input value (their products are zero): dropped.
            q = pos * p["window_strides"][d] + tap * p["rhs_dilation"][d] - p["padding"][d][0]
            valid &= (q >= 0) & (q <= (size - 1) * lhs_dil) & (q % lhs_dil == 0)
            x_pos.append(np.where(valid, q // lhs_dil, 0))
            taps.append(tap)
        li, ri = [None] * lhs.ndim, [None] * rhs.ndim
        li[dn.lhs_spec[0]], li[dn.lhs_spec[1]] = n, c
        ri[dn.rhs_spec[0]], ri[dn.rhs_spec[1]] = o, i
        for d, (q, t) in enumerate(zip(x_pos, taps, strict=True)):
            li[dn.lhs_spec[2 + d]], ri[dn.rhs_spec[2 + d]] = q, t
        keep = np.flatnonzero(valid)
        return lhs[tuple(v[keep] for v in li)], rhs[tuple(v[keep] for v in ri)]

    def _sample_ragged_dot_general(self, eqn, lhs, rhs, group_sizes):
        """``lax.ragged_dot``'s pairs (other layouts: not sampled), with a validity mask.

        Row ``r`` of ``lhs`` multiplies ``rhs[group(r)]``; rows past
        ``sum(group_sizes)`` multiply nothing. The group sizes are values of
        the program, so the draws past them are dropped after it ran (the
        third array, ``valid``).
        """
        layout = (
            _ragged_dimensions(eqn.params) == _RAGGED_DOT_LAYOUT
            and eqn.params.get("group_offset") is None
        )
        if not layout or lhs.ndim != 2 or rhs.ndim != 3 or lhs.size == 0 or rhs.size == 0:
            return None
        num_groups = rhs.shape[0]
        r, k, j = (self._indices(n) for n in (lhs.shape[0], lhs.shape[1], rhs.shape[2]))
        group = _group_of(group_sizes, [lhs.shape[0]])[r]
        return lhs[r, k], rhs[jax.numpy.minimum(group, num_groups - 1), k, j], group < num_groups

    _sample_ragged_dot = _sample_ragged_dot_general


def operand_samples(fun: Callable, *, num: int = 65536, seed: int = 0) -> Callable:
    """Samples the operand pairs that each matrix product / convolution of ``fun`` multiplies.

    For :func:`approx_jax.characterize`'s ``samples``: the error of a
    multiplier on the values a real model multiplies, layer by layer. ``fun``
    runs natively (jitted); for every floating-point ``dot_general`` and
    ``conv_general_dilated`` evaluated (also in nested ``jit``,
    ``checkpoint``, custom-derivative functions and ``scan`` bodies such as
    RNN cells, over all iterations; products inside ``while_loop`` / ``cond``
    bodies are not sampled), ``num`` pairs ``(a, b)`` are drawn uniformly
    from the pairs it multiplies (the
    left operand / input as ``a``, the right operand / kernel as ``b``);
    convolution pairs that meet padding or dilation holes are dropped. The
    grouped products of ``lax.ragged_dot`` are sampled too (row ``r`` with
    its group's weights; draws past ``sum(group_sizes)`` are dropped);
    other ``ragged_dot_general`` layouts are not.

    Args:
      fun: The function, as for :func:`approximate` (e.g. ``model.apply``).
      num: Pairs drawn per product (fewer for convolutions: padding draws are
        dropped).
      seed: Seed of the draws.

    Returns:
      A function with ``fun``'s arguments that returns a dict from each
      product's name (the Flax module path, as :func:`approximate` matches
      it, else the primitive's name; ``#2``, ``#3`` for repeats) to a pair of
      float NumPy arrays ``(a, b)``.

    Raises:
      TypeError: (from the returned function) when called under ``jax.jit``,
        ``grad`` or ``vmap``: the samples are NumPy arrays.

    Example:
      >>> pairs = approx_jax.operand_samples(model.apply)(params, x)
      >>> for layer, ab in pairs.items():
      ...     print(layer, approx_jax.characterize("mbm7", samples=ab).mred)
    """
    if not isinstance(num, (int, np.integer)) or num < 1:
        raise ValueError(f"num must be a positive int, got {num!r}")

    def sampled(*args, **kwargs):
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves((args, kwargs))):
            # (The samples are NumPy arrays, values the caller reads: they
            # cannot come out of a traced program.)
            raise TypeError(
                "operand_samples(fun)(...) returns NumPy arrays and cannot be called under "
                "jax.jit, grad or vmap (an argument is a tracer): call it outside the "
                "transformation, on concrete arrays"
            )
        closed, dyn_leaves, _ = _trace(fun, args, kwargs)

        def run(*dyn):
            recorder = _Recorder(int(num), seed)
            recorder.eval(closed.jaxpr, closed.consts, dyn)
            return recorder.samples

        samples = jax.jit(run)(*dyn_leaves)
        out = {}
        for key, (a, b, *valid) in samples.items():
            keep = np.asarray(valid[0]) if valid else slice(None)  # (ragged dots' draws)
            out[key] = (np.asarray(a)[keep], np.asarray(b)[keep])
        return out

    return sampled


# --------------------------------------------------------------------------
# einsum: jnp.einsum with its products simulated, in the caller's operand order.


def einsum(*operands, multiplier, backward: str = "approx", **kwargs) -> jax.Array:
    """``jnp.einsum`` with every product simulated (SPEC sections 2 and 5).

    Each product's operand ``a`` is the element of the earlier einsum
    operand, ``b`` that of the later one (for more than two operands: the
    contraction order ``optimize`` chooses, each intermediate result taking
    the place of its earliest operand). Sums are float32 as in
    :func:`approx_matmul`. The products are those ``jnp.einsum`` computes: it
    first sums (natively) an index that only one operand has and the output
    lacks (``"ij,jk->"`` sums ``i`` of ``x`` and ``k`` of ``y``, then multiplies
    the sums), and a repeated index (``"ii,ij->j"``) takes the diagonal.

    Args:
      *operands: as for ``jnp.einsum``: a subscripts string and arrays, or
        the interleaved form ``(x, [0, 1], y, [1, 2], [0, 2])``.
      multiplier: a ``Multiplier`` or a name such as ``"mbm7"`` (a stack gives
        a leading design axis, computed in one call per product).
      backward: ``"approx"`` or ``"exact"`` (see :func:`approx_dot`).
      **kwargs: ``jnp.einsum``'s keywords (``optimize``, ``precision``,
        ``preferred_element_type``).

    Returns:
      The einsum's result (with a leading design axis for a stack).

    Example:
      >>> scores = approx_jax.einsum("bqhd,bkhd->bhqk", q, k, multiplier="mbm7")
    """
    if operands and not isinstance(operands[0], str):
        # The interleaved form: subscript lists at odd positions (and last),
        # which must stay static, also when given as NumPy arrays.
        last = len(operands) - 1
        operands = tuple(
            tuple(x.tolist()) if isinstance(x, np.ndarray) and (i % 2 or i == last) else x
            for i, x in enumerate(operands)
        )
    _check_einsum_dtypes(operands)
    fn = approximate(lambda *ops: jax.numpy.einsum(*ops, **kwargs), multiplier, backward=backward)
    return fn(*operands)


def ragged_dot(
    lhs,
    rhs,
    group_sizes,
    multiplier,
    *,
    backward: str = "approx",
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """``lax.ragged_dot`` (a mixture-of-experts grouped matmul) with simulated products.

    Row ``r`` of ``lhs`` in group ``i`` (contiguous groups of sizes
    ``group_sizes``, in order) is multiplied with ``rhs[i]``: each output row
    is bit for bit :func:`approx_dot` of that row with its group's weights
    (operand ``a`` from ``lhs``, ``b`` from ``rhs``); rows past
    ``sum(group_sizes)`` are zeros, as in lax. Gradients follow SPEC's
    backward order (``P(dy, w)``, ``P(x, dy)``). Computed as one simulated
    dense product per group (``g`` times the products of the ragged dot), as
    ``approximate`` does for a ``lax.ragged_dot`` inside a function.

    Args:
      lhs: floating array ``[m, k]``.
      rhs: floating array ``[g, k, n]``.
      group_sizes: integer array ``[g]``.
      multiplier: a ``Multiplier`` or a name such as ``"mbm7"`` (a stack gives
        a leading design axis; ``"fp32"`` is ``lax.ragged_dot`` itself).
      backward: ``"approx"`` or ``"exact"`` (see :func:`approx_dot`).
      precision: ``lax.ragged_dot``'s precision (for ``"fp32"``).
      preferred_element_type: the result dtype, as for ``lax.ragged_dot``.

    Returns:
      ``[m, n]`` (with a leading design axis for a stack).

    Raises:
      TypeError: If ``lhs`` or ``rhs`` is not a floating-point array (its
        products would not be simulated).

    Example:
      >>> y = approx_jax.ragged_dot(tokens, expert_weights, group_sizes, "mbm7")
    """
    for name, x in (("lhs", lhs), ("rhs", rhs)):
        if not jax.numpy.issubdtype(jax.numpy.result_type(x), jax.numpy.floating):
            raise TypeError(
                f"approx_jax.ragged_dot: {name} must be a floating-point array, got "
                f"{jax.numpy.result_type(x)} (its products would not be simulated)"
            )
    fn = approximate(
        lambda x, w, sizes: lax.ragged_dot(
            x, w, sizes, precision=precision, preferred_element_type=preferred_element_type
        ),
        multiplier,
        backward=backward,
    )
    return fn(lhs, rhs, group_sizes)


def _check_einsum_dtypes(operands) -> None:
    """Raises TypeError for einsum products that would not be simulated.

    ``approximate`` leaves complex and integer-only products native; here
    every product is meant to be simulated (as ``approx_dot`` refuses such
    operands), so a native result, with a stack's design axis filled by
    copies of it, would be a silent wrong answer.
    """
    if operands and isinstance(operands[0], str):
        arrays = operands[1:]
    else:  # interleaved: arrays at even positions, subscript lists between
        arrays = operands[: len(operands) - (len(operands) % 2 == 1)][::2]
    for i, x in enumerate(arrays):
        if isinstance(x, list | tuple):  # as jnp.einsum, which names the problem
            raise TypeError(
                f"approx_jax.einsum requires array or scalar operands, got a "
                f"{type(x).__name__} at operand {i}"
            )
    dtypes = [jax.numpy.result_type(x) for x in arrays]
    for i, dtype in enumerate(dtypes):
        if jax.numpy.issubdtype(dtype, jax.numpy.complexfloating):
            raise TypeError(
                f"approx_jax.einsum: operand {i} is complex ({dtype}); only real "
                "floating-point products are simulated (SPEC section 1)"
            )
    if dtypes and not any(jax.numpy.issubdtype(d, jax.numpy.floating) for d in dtypes):
        raise TypeError(
            "approx_jax.einsum: no operand has a floating-point dtype (got "
            f"{', '.join(str(d) for d in dtypes)}); integer products are not simulated"
        )


class EinsumOp(hooks.Hook):
    """A ``jnp.einsum``-compatible callable simulating a multiplier (a layer hook).

    Built by :func:`approx_jax.nn.einsum`; for ``einsum_op`` of
    ``flax.nnx.Einsum`` (``approx_jax.nn.Einsum`` is that layer with it).

    Example:
      >>> layer = nnx.Einsum("ab,bc->ac", (784, 10), rngs=nnx.Rngs(0),
      ...                    einsum_op=approx_jax.nn.einsum("mbm7"))
    """

    def __call__(self, *operands, **kwargs):
        if self.multiplier.is_exact:
            return jax.numpy.einsum(*operands, **kwargs)
        return einsum(*operands, multiplier=self.multiplier, backward=self.backward, **kwargs)


def einsum_hook(multiplier="fp32", backward: str = "approx") -> EinsumOp:
    """Returns a ``jnp.einsum`` replacement that simulates ``multiplier``.

    Args:
      multiplier: a ``Multiplier`` or a name (default ``"fp32"``:
        ``jnp.einsum`` unchanged).
      backward: ``"approx"`` (default) or ``"exact"``.

    Returns:
      An :class:`EinsumOp` callable (operand ``a`` of each product from the
      earlier einsum operand: the layer input for ``nnx.Einsum``).

    Example:
      >>> layer = nnx.Einsum("bd,dh->bh", (784, 300),
      ...                    einsum_op=approx_jax.nn.einsum("mbm7"), rngs=nnx.Rngs(0))
    """
    return EinsumOp(multiplier, backward)
