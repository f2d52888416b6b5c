"""CUDA kernels against the CPU kernels and the NumPy reference (needs a GPU).

Skipped unless JAX has a GPU backend and approx_jax's CUDA module is built.

What is checked:
* ``multiply``: GPU products equal CPU products and the reference bit for bit.
* GEMM: the GPU sums k in ascending order from +0 (one float32 addition per
  term), so it must equal a NumPy float32 sequential sum of reference products
  bit for bit (NaN compared as NaN). Against the CPU kernel (whose summation
  order may be blocked) results must both be within SPEC's bound of the
  float64 reference, and bit-identical for K = 1 and for inputs whose every
  partial sum is exact.
* Split-K (rule of xla_kernels/split_k.h, shared with the CPU): each contiguous k-chunk is summed
  in ascending order from +0 and the chunk sums are added in ascending
  order, whether the kernel runs chunks in parallel (few output tiles:
  partials + reduction) or folds them in one block (many tiles). Both must
  equal the chunked NumPy sum bit for bit (built-in rule, and chunk counts
  forced by env APPROX_JAX_CUDA_SPLIT_K; fast and special-value paths,
  batched/broadcast operands), stay within SPEC's bound and be run-to-run
  deterministic; a batched call (folding mode) must give the bits of single
  calls (parallel mode). The sequential bit-exact tests use K < 1024 (one
  chunk).
* Broadcasting of the design/batch axes, stacked (vmapped) multipliers,
  gradients, K = 0 and empty outputs, and error reporting.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402


def _gpu_devices():
    # Debug hook for the test logic itself: run the "GPU" side on the CPU.
    import os

    if os.environ.get("APPROX_JAX_GPU_TEST_ON_CPU") == "1":
        return jax.devices("cpu")
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


GPU_DEVICES = _gpu_devices()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not GPU_DEVICES, reason="JAX has no GPU backend"),
]

from approx_test_utils import underflow_edge_values  # noqa: E402

import approx_jax  # noqa: E402
from approx_jax._src import ffi as ffi_lib  # noqa: E402
from approx_jax._src import lut as lut_lib  # noqa: E402
from approx_jax._src import reference  # noqa: E402

if (
    GPU_DEVICES
    and GPU_DEVICES[0].platform != "cpu"
    and "cuda" not in ffi_lib.registered_platforms()
):
    pytestmark.append(pytest.mark.skip(reason="approx_jax was built without its CUDA module"))


def _api(name):
    """Public op (``approx_jax.NAME``), falling back to the internal module."""
    fn = getattr(approx_jax, name, None)
    if fn is not None:
        return fn
    if name == "approx_conv":
        from approx_jax._src import conv

        return conv.approx_conv
    from approx_jax._src import ops

    return getattr(ops, name)


def _multipliers():
    mod = getattr(approx_jax, "multipliers", None)
    if mod is not None and hasattr(mod, "mbm"):
        return mod
    from approx_jax._src import multipliers

    return multipliers


MB = _multipliers()
MBITS = (3, 5, 7, 8, 11)
CPU = jax.devices("cpu")[0]
GPU = GPU_DEVICES[0] if GPU_DEVICES else None


def run_on(device, fn, *args):
    """Runs ``jit(fn)`` with every array argument committed to ``device``."""
    placed = [jax.device_put(np.asarray(a), device) for a in args]
    out = jax.jit(fn)(*placed)
    return jax.tree_util.tree_map(np.asarray, out)


def bits(x) -> np.ndarray:
    return np.asarray(x, np.float32).view(np.uint32)


def random_lut(M: int, rng: np.random.Generator) -> np.ndarray:
    """Random stored-format LUT (carry and mantissa bits uniform)."""
    n = 4**M
    return lut_lib.encode(rng.integers(0, 2, n), rng.integers(0, 2**M, n), M)


def multiplier_cases(M: int, rng):
    yield "mbm", MB.mbm(M)
    yield "random", MB.from_lut(random_lut(M, rng), M)
    if M <= 7:
        yield "mitchell", MB.mitchell(M)
        yield "truncate", MB.truncate(M)


SPECIALS = np.array(
    [
        0.0,
        -0.0,
        np.inf,
        -np.inf,
        np.nan,
        1e-40,
        -1e-40,
        2.0**-126,
        2.0**-70,
        -(2.0**-64),
        2.0**70,
        -(2.0**100),
        3.4e38,
        -3.4e38,
        1.0,
        -1.5,
        1.9999999,
        2.0**64,
    ],
    np.float32,
)


def random_operands(shape, rng, specials: float = 0.0, exp_range: int = 8) -> np.ndarray:
    """Normals with mixed exponents, a fraction of them replaced by specials."""
    mant = rng.uniform(1.0, 2.0, shape)
    exps = rng.integers(-exp_range, exp_range + 1, shape)
    sign = rng.choice([-1.0, 1.0], shape)
    x = (sign * mant * np.exp2(exps)).astype(np.float32)
    zeros = rng.random(shape) < 0.05
    x[zeros] = 0.0
    if specials:
        mask = rng.random(shape) < specials
        x[mask] = rng.choice(SPECIALS, int(mask.sum()))
    return x


def sequential_gemm(a, b, stored, M) -> np.ndarray:
    """float32 sum over k in ascending order from +0 of reference products."""
    return reference.sequential_dot(a, b, stored, M)


# Mirrors xla_kernels/split_k.h (SplitKChunkLength), shared by CPU and CUDA:
# the order depends on one product's M, N and K only.
SPLIT_K_MIN_K = 4096
SPLIT_K_MAX_PARTIALS = 1 << 24
SPLIT_K_MIN_CHUNK = 1024
SPLIT_K_MAX_CHUNKS = 64
SPLIT_K_ALIGN = 256


def split_k_chunks(K: int, want: int = 0, rows: int = 1, cols: int = 1):
    """[(k0, k1)] k-chunks: built-in rule for ``want <= 0``, else ~``want`` chunks."""
    if want <= 0:
        if K < SPLIT_K_MIN_K:
            return [(0, K)]
        per = -(-K // SPLIT_K_MAX_CHUNKS)
        kspan = max(SPLIT_K_MIN_CHUNK, -(-per // SPLIT_K_ALIGN) * SPLIT_K_ALIGN)
        if kspan >= K or -(-K // kspan) * rows * cols > SPLIT_K_MAX_PARTIALS:
            return [(0, K)]
    else:
        per = -(-K // want)
        kspan = -(-per // 8) * 8
    return [(k0, min(K, k0 + kspan)) for k0 in range(0, K, kspan)]


def chunked_gemm(a, b, stored, M, want: int = 0) -> np.ndarray:
    """Split-K order: per chunk an ascending sum from +0, partials added in order."""
    K = a.shape[1]
    chunks = split_k_chunks(K, want, a.shape[0], b.shape[1])
    if len(chunks) < 2:
        return sequential_gemm(a, b, stored, M)
    acc = None
    with np.errstate(invalid="ignore", over="ignore"):
        for k0, k1 in chunks:
            part = sequential_gemm(a[:, k0:k1], b[k0:k1], stored, M)
            acc = part if acc is None else (acc + part).astype(np.float32)
    return acc


def assert_bits_equal(got, want, what=""):
    got = np.asarray(got, np.float32)
    want = np.asarray(want, np.float32)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    nan_got, nan_want = np.isnan(got), np.isnan(want)
    np.testing.assert_array_equal(nan_got, nan_want, err_msg=f"{what}: NaN positions")
    ok = nan_got | (bits(got) == bits(want))
    if not ok.all():
        idx = np.argwhere(~ok)[:5]
        details = [(tuple(i), got[tuple(i)], want[tuple(i)]) for i in idx]
        raise AssertionError(f"{what}: {int((~ok).sum())} elements differ, e.g. {details}")


def assert_within_bound(got, a, b, stored, M, what=""):
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    rows, K = a.shape[-2:]
    step = max(1, (1 << 22) // max(1, rows * b.shape[-1]))  # bound the products' memory
    ref = abs_sum = 0.0
    for k0 in range(0, K, step):
        r, s = reference.dot_with_bound(a[..., k0 : k0 + step], b[k0 : k0 + step], stored, M)
        ref, abs_sum = ref + r, abs_sum + s
    ok = reference.bound_ok(got, ref, abs_sum, a.shape[-1])
    assert ok.all(), f"{what}: {int((~ok).sum())} elements outside the SPEC bound"


# --------------------------------------------------------------------------
# multiply


@pytest.mark.parametrize("M", MBITS)
def test_multiply_bits_match_cpu_and_reference(M):
    rng = np.random.default_rng(100 + M)
    n = 20011
    a = random_operands(n, rng, specials=0.05, exp_range=70)
    b = random_operands(n, rng, specials=0.05, exp_range=70)
    multiply = _api("multiply")
    for name, m in multiplier_cases(M, rng):
        fn = lambda x, y, m=m: multiply(x, y, m)  # noqa: E731
        got_gpu = run_on(GPU, fn, a, b)
        got_cpu = run_on(CPU, fn, a, b)
        want = reference.product_bits(a, b, np.asarray(m.lut), M)
        np.testing.assert_array_equal(bits(got_gpu), want, err_msg=f"{name}{M} GPU vs reference")
        np.testing.assert_array_equal(bits(got_gpu), bits(got_cpu), err_msg=f"{name}{M} GPU vs CPU")


def test_multiply_stacked_designs():
    rng = np.random.default_rng(7)
    stacked = MB.stack([MB.mbm(5), MB.mitchell(5), MB.from_lut(random_lut(5, rng), 5)])
    a = random_operands((33, 17), rng, specials=0.05)
    b = random_operands((17,), rng, specials=0.05)
    multiply = _api("multiply")
    got = run_on(GPU, lambda x, y: multiply(x, y, stacked), a, b)
    assert got.shape == (3, 33, 17)
    for d in range(3):
        want = reference.product_bits(a, b, np.asarray(stacked.lut)[d], stacked.mbits)
        np.testing.assert_array_equal(bits(got[d]), want)


# --------------------------------------------------------------------------
# GEMM: bit-exact order, bounds, CPU agreement

GEMM_SHAPES = [(1, 1, 1), (17, 33, 65), (128, 256, 64), (131, 40, 260), (5, 1003, 7)]


@pytest.mark.parametrize("M", MBITS)
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gemm_sequential_bits_and_bound(M, shape):
    rows, K, N = shape
    rng = np.random.default_rng(rows * 7 + K * 3 + N + M)
    a = random_operands((rows, K), rng)
    b = random_operands((K, N), rng)
    approx_dot = _api("approx_dot")
    for name, m in multiplier_cases(M, rng):
        if name in ("truncate", "mitchell") and shape != (17, 33, 65):
            continue  # keep the runtime down: two LUTs per shape are enough
        stored = np.asarray(m.lut)
        fn = lambda x, w, m=m: approx_dot(x, w, m)  # noqa: E731
        got_gpu = run_on(GPU, fn, a, b)
        got_cpu = run_on(CPU, fn, a, b)
        assert_bits_equal(got_gpu, sequential_gemm(a, b, stored, M), f"{name}{M} GPU order")
        assert_within_bound(got_gpu, a, b, stored, M, f"{name}{M} GPU")
        assert_within_bound(got_cpu, a, b, stored, M, f"{name}{M} CPU")
        if K == 1:
            assert_bits_equal(got_gpu, got_cpu, f"{name}{M} K=1 GPU vs CPU")


@pytest.mark.parametrize("M", MBITS)
def test_gemm_special_values_take_the_exact_path(M):
    # Inf/NaN/huge operands force the scalar path for their k-chunk; other
    # chunks of the same tile stay on the fast path. Both must give the
    # sequential sum's bits.
    rng = np.random.default_rng(300 + M)
    rows, K, N = 70, 90, 150
    a = random_operands((rows, K), rng, specials=0.01, exp_range=60)
    b = random_operands((K, N), rng, specials=0.01, exp_range=60)
    m = MB.from_lut(random_lut(M, rng), M)
    got = run_on(GPU, lambda x, w: _api("approx_dot")(x, w, m), a, b)
    assert_bits_equal(got, sequential_gemm(a, b, np.asarray(m.lut), M), f"specials M={M}")


@pytest.mark.parametrize("M", MBITS)
def test_gemm_underflow_and_subnormals(M):
    # Exponent sums around the underflow threshold (e0 = ea + eb - 127 <= 0)
    # and subnormal operands, all on the fast path.
    rng = np.random.default_rng(400 + M)
    rows, K, N = 40, 24, 36
    a = rng.uniform(1, 2, (rows, K)) * np.exp2(rng.integers(-70, -55, (rows, K)))
    a = a.astype(np.float32)
    b = (rng.uniform(1, 2, (K, N)) * np.exp2(rng.integers(-72, -56, (K, N)))).astype(np.float32)
    a[rng.random(a.shape) < 0.1] = np.float32(1e-40)
    b[rng.random(b.shape) < 0.1] = np.float32(1e-41)
    # Same-sign products: partial sums never become subnormal (that case is
    # test_gemm_subnormal_partial_sums_cpu_and_gpu).
    m = MB.mbm(M)
    got = run_on(GPU, lambda x, w: _api("approx_dot")(x, w, m), a, b)
    assert_bits_equal(got, sequential_gemm(a, b, np.asarray(m.lut), M), f"underflow M={M}")


@pytest.mark.parametrize("M", (3, 7, 11))
def test_gemm_subnormal_partial_sums_cpu_and_gpu(M, monkeypatch):
    # |x| ~ 2^-63, mixed signs: partial sums cancel into the subnormal range.
    # Both backends add in IEEE float32 (the CPU kernels clear XLA's FTZ/DAZ
    # while they run; CUDA's fma.rn / add.rn keep subnormals), so both give
    # the sequential order's bits, with either CUDA kernel.
    rng = np.random.default_rng(600 + M)
    rows, K, N = 70, 40, 66

    a, b = underflow_edge_values(rng, (rows, K)), underflow_edge_values(rng, (K, N))
    for name, m in multiplier_cases(M, rng):
        fn = lambda x, w, m=m: _api("approx_dot")(x, w, m)  # noqa: E731
        want = sequential_gemm(a, b, np.asarray(m.lut), M)
        assert_bits_equal(run_on(CPU, fn, a, b), want, f"{name}{M} subnormal sums CPU")
        assert_bits_equal(run_on(GPU, fn, a, b), want, f"{name}{M} subnormal sums GPU")
        if M <= 7:
            monkeypatch.setenv("APPROX_JAX_CUDA_EXPANDED", "0")
            assert_bits_equal(run_on(GPU, fn, a, b), want, f"{name}{M} LUT kernel")
            monkeypatch.delenv("APPROX_JAX_CUDA_EXPANDED")


@pytest.mark.parametrize("M", MBITS)
def test_gemm_exact_partial_sums_match_cpu_bits(M):
    # Small integers: every product has <= M + 1 significant bits and a small
    # exponent, every partial sum is exact, so any summation order gives the
    # same bits on every backend.
    rng = np.random.default_rng(500 + M)
    rows, K, N = 37, 16, 45
    a = rng.integers(-7, 8, (rows, K)).astype(np.float32)
    b = rng.integers(-7, 8, (K, N)).astype(np.float32)
    for name, m in multiplier_cases(M, rng):
        fn = lambda x, w, m=m: _api("approx_dot")(x, w, m)  # noqa: E731
        got_gpu = run_on(GPU, fn, a, b)
        got_cpu = run_on(CPU, fn, a, b)
        assert_bits_equal(got_gpu, got_cpu, f"{name}{M} exact sums GPU vs CPU")
        ref = reference.dot(a, b, np.asarray(m.lut), M)
        np.testing.assert_array_equal(got_gpu.astype(np.float64), ref)


def test_gemm_deterministic():
    rng = np.random.default_rng(9)
    a = random_operands((300, 515), rng)
    b = random_operands((515, 200), rng)
    m = MB.mbm(7)
    fn = lambda x, w: _api("approx_dot")(x, w, m)  # noqa: E731
    first = run_on(GPU, fn, a, b)
    for _ in range(2):
        np.testing.assert_array_equal(bits(run_on(GPU, fn, a, b)), bits(first))


# --------------------------------------------------------------------------
# Broadcasting, batching, stacked designs (the FFI contract directly too)


@pytest.mark.parametrize("M", (5, 8))
def test_ffi_gemm_broadcast_axes(M):
    rng = np.random.default_rng(600 + M)
    rows, K, N, D, B = 19, 21, 23, 2, 3
    stored = np.stack([random_lut(M, rng) for _ in range(D)])
    klut = lut_lib.kernel_lut_numpy(stored, M)
    a = random_operands((D, 1, rows, K), rng, specials=0.01)
    b = random_operands((1, B, K, N), rng, specials=0.01)

    def fn(x, w, lut):
        return ffi_lib.gemm_call(x, w, lut, M)

    got = run_on(GPU, fn, a, b, klut)
    assert got.shape == (D, B, rows, N)
    for d in range(D):
        for bi in range(B):
            want = sequential_gemm(a[d, 0], b[0, bi], stored[d], M)
            assert_bits_equal(got[d, bi], want, f"d={d} b={bi}")
    # A single LUT broadcast over designs of a.
    got1 = run_on(GPU, fn, a, b, klut[:1])
    for d in range(D):
        assert_bits_equal(got1[d, 1], sequential_gemm(a[d, 0], b[0, 1], stored[0], M))


def test_ffi_gemm_k0_and_empty():
    M = 5
    klut = lut_lib.kernel_lut_numpy(MB.mbm(M).lut, M)[None]

    def fn(x, w, lut):
        return ffi_lib.gemm_call(x, w, lut, M)

    a = np.zeros((1, 2, 7, 0), np.float32)
    b = np.zeros((1, 1, 0, 9), np.float32)
    got = run_on(GPU, fn, a, b, klut)
    assert got.shape == (1, 2, 7, 9)
    np.testing.assert_array_equal(bits(got), 0)
    got = run_on(
        GPU, fn, np.zeros((1, 1, 0, 4), np.float32), np.ones((1, 1, 4, 3), np.float32), klut
    )
    assert got.shape == (1, 1, 0, 3)
    got = run_on(
        GPU,
        lambda x, y, lut: ffi_lib.multiply_call(x, y, lut, M),
        np.zeros((1, 0), np.float32),
        np.zeros((1, 0), np.float32),
        klut,
    )
    assert got.shape == (1, 0)


def test_ffi_errors_are_reported():
    M = 3
    klut = lut_lib.kernel_lut_numpy(MB.mbm(M).lut, M)[None]
    a = np.ones((1, 1, 4, 4), np.float32)
    with pytest.raises(Exception, match="4\\^mbits|entries"):
        run_on(GPU, lambda x, lut: ffi_lib.gemm_call(x, x, lut, 4), a, klut)  # wrong mbits
    with pytest.raises(Exception, match="uint32"):
        run_on(GPU, lambda x, lut: ffi_lib.gemm_call(x, x, lut, M), a, klut.astype(np.int32))


def test_approx_matmul_batched_broadcast():
    rng = np.random.default_rng(11)
    M = 7
    m = MB.mbm(M)
    a = random_operands((33, 20), rng)  # broadcast (stride 0) over the batch
    b = random_operands((4, 20, 18), rng)
    got = run_on(GPU, lambda x, y: _api("approx_matmul")(x, y, m), a, b)
    assert got.shape == (4, 33, 18)
    for i in range(4):
        assert_bits_equal(got[i], sequential_gemm(a, b[i], np.asarray(m.lut), M), f"batch {i}")


def test_stacked_multiplier_and_vmap_match_single_designs():
    rng = np.random.default_rng(12)
    designs = [MB.mbm(5), MB.mitchell(5), MB.from_lut(random_lut(5, rng), 5)]
    stacked = MB.stack(designs)
    x = random_operands((2, 9, 40), rng)
    w = random_operands((40, 30), rng)
    approx_dot = _api("approx_dot")
    got = run_on(GPU, lambda a, b: approx_dot(a, b, stacked), x, w)
    assert got.shape == (3, 2, 9, 30)

    def by_lut(a, b, lut):
        import dataclasses

        return approx_dot(a, b, dataclasses.replace(designs[0], lut=lut))

    luts = np.stack([np.asarray(d.lut) for d in designs])
    got_vmap = run_on(GPU, jax.vmap(by_lut, in_axes=(None, None, 0)), x, w, luts)
    for d, m in enumerate(designs):
        single = run_on(GPU, lambda a, b, m=m: approx_dot(a, b, m), x, w)
        assert_bits_equal(got[d], single, f"stack design {d}")
        assert_bits_equal(got_vmap[d], single, f"vmap design {d}")
        want = sequential_gemm(x.reshape(-1, 40), w, np.asarray(m.lut), 5).reshape(2, 9, 30)
        assert_bits_equal(single, want, f"design {d} order")


# --------------------------------------------------------------------------
# Gradients and convolution


@pytest.mark.parametrize("backward", ["approx", "exact"])
def test_gradients_on_gpu(backward):
    rng = np.random.default_rng(13)
    M = 7
    m = MB.mbm(M)
    x = random_operands((24, 31), rng)
    w = random_operands((31, 17), rng)
    dy = random_operands((24, 17), rng)
    approx_dot = _api("approx_dot")

    def loss(a, b, g):
        return jnp.sum(approx_dot(a, b, m, backward=backward) * g)

    grad_fn = jax.grad(loss, argnums=(0, 1))
    dx_gpu, dw_gpu = run_on(GPU, grad_fn, x, w, dy)
    dx_cpu, dw_cpu = run_on(CPU, grad_fn, x, w, dy)
    (dx_ref, dx_abs), (dw_ref, dw_abs) = reference.dot_vjp(
        x, w, dy, np.asarray(m.lut), M, backward, with_bound=True
    )
    for got, ref, abs_sum, k, what in [
        (dx_gpu, dx_ref, dx_abs, 17, "dx gpu"),
        (dx_cpu, dx_ref, dx_abs, 17, "dx cpu"),
        (dw_gpu, dw_ref, dw_abs, 24, "dw gpu"),
        (dw_cpu, dw_ref, dw_abs, 24, "dw cpu"),
    ]:
        ok = reference.bound_ok(got, ref, abs_sum, k)
        assert ok.all(), f"{backward} {what}: {int((~ok).sum())} outside bound"


def test_conv_gpu_matches_reference_bound():
    rng = np.random.default_rng(14)
    M = 5
    m = MB.mbm(M)
    x = random_operands((2, 9, 9, 3), rng)  # NHWC
    k = random_operands((3, 3, 3, 4), rng)  # HWIO
    dn = ("NHWC", "HWIO", "NHWC")
    conv = _api("approx_conv")
    fn = lambda a, b: conv(a, b, m, padding="SAME", dimension_numbers=dn)  # noqa: E731
    got_gpu = run_on(GPU, fn, x, k)
    got_cpu = run_on(CPU, fn, x, k)
    ref, abs_sum, terms = reference.conv_general_dilated_with_bound(
        x, k, np.asarray(m.lut), M, (1, 1), "SAME", dimension_numbers=dn
    )
    for got, what in [(got_gpu, "gpu"), (got_cpu, "cpu")]:
        ok = reference.bound_ok(got, ref, abs_sum, terms)
        assert ok.all(), f"conv {what}: {int((~ok).sum())} outside bound"


# --------------------------------------------------------------------------
# Split-K (deterministic chunked summation for few output tiles, large K)

needs_real_gpu = pytest.mark.skipif(
    GPU is None or GPU.platform == "cpu", reason="split-K is a CUDA kernel feature"
)


@needs_real_gpu
@pytest.mark.parametrize("M", (3, 7, 11))
@pytest.mark.parametrize(
    "shape,want",
    [((17, 1000, 33), 3), ((5, 203, 7), 4), ((300, 77, 70), 2), ((9, 1030, 130), 5)],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v),
)
def test_gemm_split_k_forced_matches_chunked_sum(M, shape, want, monkeypatch):
    monkeypatch.setenv("APPROX_JAX_CUDA_SPLIT_K", str(want))
    rows, K, N = shape
    rng = np.random.default_rng(700 + M + K)
    a = random_operands((rows, K), rng)
    b = random_operands((K, N), rng)
    m = MB.from_lut(random_lut(M, rng), M)
    stored = np.asarray(m.lut)
    fn = lambda x, w: _api("approx_dot")(x, w, m)  # noqa: E731
    got = run_on(GPU, fn, a, b)
    assert_bits_equal(got, chunked_gemm(a, b, stored, M, want), f"split {want} M={M}")
    assert_within_bound(got, a, b, stored, M, f"split {want} M={M}")
    # Special values: the exact scalar path runs per k-chunk inside a split.
    a = random_operands((rows, K), rng, specials=0.003, exp_range=60)
    b = random_operands((K, N), rng, specials=0.003, exp_range=60)
    got = run_on(GPU, fn, a, b)
    assert_bits_equal(got, chunked_gemm(a, b, stored, M, want), f"split {want} specials M={M}")


@needs_real_gpu
def test_gemm_split_k_forced_batched_broadcast(monkeypatch):
    monkeypatch.setenv("APPROX_JAX_CUDA_SPLIT_K", "3")
    M = 5
    rng = np.random.default_rng(710)
    rows, K, N, D, B = 11, 300, 20, 2, 3
    stored = np.stack([random_lut(M, rng) for _ in range(D)])
    klut = lut_lib.kernel_lut_numpy(stored, M)
    a = random_operands((D, 1, rows, K), rng, specials=0.002)
    b = random_operands((1, B, K, N), rng, specials=0.002)
    got = run_on(GPU, lambda x, w, lut: ffi_lib.gemm_call(x, w, lut, M), a, b, klut)
    assert got.shape == (D, B, rows, N)
    for d in range(D):
        for bi in range(B):
            want = chunked_gemm(a[d, 0], b[0, bi], stored[d], M, 3)
            assert_bits_equal(got[d, bi], want, f"d={d} b={bi}")


@needs_real_gpu
def test_gemm_split_k_forced_one_disables(monkeypatch):
    monkeypatch.setenv("APPROX_JAX_CUDA_SPLIT_K", "1")
    rng = np.random.default_rng(720)
    a = random_operands((7, 4000), rng)
    b = random_operands((4000, 9), rng)
    m = MB.mbm(7)
    got = run_on(GPU, lambda x, w: _api("approx_dot")(x, w, m), a, b)
    assert_bits_equal(got, sequential_gemm(a, b, np.asarray(m.lut), 7), "no split")


@needs_real_gpu
@pytest.mark.parametrize(
    "M,shape",
    [(5, (25, 6144, 32)), (7, (260, 4608, 20)), (8, (130, 4400, 72)), (11, (20, 4096, 24))],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else f"M{v}",
)
def test_gemm_split_k_builtin_rule(M, shape, monkeypatch):
    # Weight-gradient-like shapes: tiny output, large K (parallel split-K).
    monkeypatch.delenv("APPROX_JAX_CUDA_SPLIT_K", raising=False)
    rows, K, N = shape
    rng = np.random.default_rng(800 + M + rows)
    a = random_operands((rows, K), rng)
    b = random_operands((K, N), rng)
    m = MB.mbm(M)
    stored = np.asarray(m.lut)
    fn = lambda x, w: _api("approx_dot")(x, w, m)  # noqa: E731
    got = run_on(GPU, fn, a, b)
    assert len(split_k_chunks(K, 0, rows, N)) >= 2
    assert_bits_equal(got, chunked_gemm(a, b, stored, M), f"built-in split rule M={M}")
    assert_within_bound(got, a, b, stored, M, f"split M={M}")
    for _ in range(2):
        assert_bits_equal(run_on(GPU, fn, a, b), got, "split run-to-run")


@needs_real_gpu
@pytest.mark.parametrize("want", [0, 5], ids=["builtin", "forced5"])
def test_gemm_split_k_batched_folding_matches_single(want, monkeypatch):
    # 400 one-tile matrices: enough tiles that every block folds its chunks
    # in-block; a single matrix runs its chunks in parallel. Same bits.
    if want:
        monkeypatch.setenv("APPROX_JAX_CUDA_SPLIT_K", str(want))
    else:
        monkeypatch.delenv("APPROX_JAX_CUDA_SPLIT_K", raising=False)
    rng = np.random.default_rng(900 + want)
    M = 7
    m = MB.mbm(M)
    stored = np.asarray(m.lut)
    batch, rows, K, N = 400, 12, 4200, 8
    a = random_operands((batch, rows, K), rng, specials=0.0005)
    b = random_operands((batch, K, N), rng)  # batched b: a true batch axis
    assert len(split_k_chunks(K, want, rows, N)) >= 2
    matmul = _api("approx_matmul")
    got = run_on(GPU, lambda x, w: matmul(x, w, m), a, b)
    assert got.shape == (batch, rows, N)
    for i in (0, 1, 199, batch - 1):
        want_bits = chunked_gemm(a[i], b[i], stored, M, want)
        assert_bits_equal(got[i], want_bits, f"batched element {i}")
        single = run_on(GPU, lambda x, w: _api("approx_dot")(x, w, m), a[i], b[i])
        assert_bits_equal(single, got[i], f"single vs batched element {i}")


@pytest.mark.parametrize(
    "M,shape",
    [
        (7, (64, 300, 48)),
        (3, (25, 6144, 32)),
        (7, (130, 4400, 72)),
        (11, (20, 4096, 24)),
        (7, (280, 4224, 256)),
        (5, (300, 5000, 130)),
    ],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else f"M{v}",
)
def test_gemm_cpu_and_gpu_bit_identical(M, shape, monkeypatch):
    # CPU and CUDA share the scalar product (approx_math.h) and the split-K
    # rule (split_k.h), so their GEMM sums agree bit for bit.
    monkeypatch.delenv("APPROX_JAX_CUDA_SPLIT_K", raising=False)
    rows, K, N = shape
    rng = np.random.default_rng(1000 + M + K)
    a = random_operands((rows, K), rng)
    b = random_operands((K, N), rng)
    m = MB.mbm(M)
    fn = lambda x, w: _api("approx_dot")(x, w, m)  # noqa: E731
    assert_bits_equal(run_on(GPU, fn, a, b), run_on(CPU, fn, a, b), f"CPU vs GPU M={M} {shape}")


# --------------------------------------------------------------------------
# Expanded-operand kernel (M <= 7, the default there) vs the LUT kernel
# (APPROX_JAX_CUDA_EXPANDED=0): both must give the sequential sum's bits.

EXPANDED_SHAPES = [(300, 70, 130), (257, 41, 64), (33, 19, 200), (9, 300, 7)]


@pytest.mark.parametrize("M", (1, 2, 3, 4, 5, 6, 7))
@pytest.mark.parametrize("shape", EXPANDED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gemm_expanded_kernel_all_widths(M, shape, monkeypatch):
    rows, K, N = shape
    rng = np.random.default_rng(2000 + 17 * M + rows + K + N)
    # exp_range 40 keeps every operand on the fast path except the zeros.
    a = random_operands((rows, K), rng, exp_range=40)
    b = random_operands((K, N), rng, exp_range=40)
    m = MB.from_lut(random_lut(M, rng), M)
    stored = np.asarray(m.lut)
    fn = lambda x, w: _api("approx_dot")(x, w, m)  # noqa: E731
    got = run_on(GPU, fn, a, b)
    assert_bits_equal(got, sequential_gemm(a, b, stored, M), f"expanded M={M} {shape}")
    monkeypatch.setenv("APPROX_JAX_CUDA_EXPANDED", "0")
    got_lut = run_on(GPU, fn, a, b)
    assert_bits_equal(got_lut, got, f"LUT kernel vs expanded M={M} {shape}")
    monkeypatch.delenv("APPROX_JAX_CUDA_EXPANDED")
    if M <= 5 and N > 64:
        # The opt-in 128-register build of the wide tile (two blocks per SM):
        # same arithmetic, same bits.
        monkeypatch.setenv("APPROX_JAX_CUDA_EXPANDED_BLOCKS", "2")
        assert_bits_equal(run_on(GPU, fn, a, b), got, f"two-blocks build M={M} {shape}")
        monkeypatch.delenv("APPROX_JAX_CUDA_EXPANDED_BLOCKS")
    # The opt-in 128 x 64 tile for grids it fills better (300 or 257 rows are
    # two 256-row tiles but three small ones: better on any GPU of >= 3 SMs).
    monkeypatch.setenv("APPROX_JAX_CUDA_EXPANDED_FILL", "1")
    assert_bits_equal(run_on(GPU, fn, a, b), got, f"fill tile M={M} {shape}")
    if M == 7:
        # The opt-in 8-k chunks at M = 7 (the 256 x 64 tile of M <= 6), with
        # and without the fill tile.
        monkeypatch.setenv("APPROX_JAX_CUDA_EXPANDED_M7_BK", "8")
        assert_bits_equal(run_on(GPU, fn, a, b), got, f"M = 7 fill, kBK = 8 {shape}")
        monkeypatch.delenv("APPROX_JAX_CUDA_EXPANDED_FILL")
        assert_bits_equal(run_on(GPU, fn, a, b), got, f"M = 7 with kBK = 8 {shape}")


@pytest.mark.parametrize("M", (2, 5, 6, 7))
def test_gemm_expanded_kernel_exponent_edges(M, monkeypatch):
    # Biased exponents at the fast path's edges: 64 and 190 stay fast, 63 and
    # 191 send their k-chunk to the scalar path; products near the underflow
    # and overflow thresholds, subnormals, Inf/NaN in some chunks.
    rng = np.random.default_rng(3000 + M)
    rows, K, N = 260, 96, 72
    edge = np.exp2(np.array([64 - 127, 63 - 127, 190 - 127, 191 - 127, 0.0], np.float64))
    a = random_operands((rows, K), rng)
    b = random_operands((K, N), rng)
    for x in (a, b):
        mask = rng.random(x.shape) < 0.03
        x[mask] = (rng.choice(edge, int(mask.sum())) * rng.uniform(1, 2, int(mask.sum()))).astype(
            np.float32
        ) * rng.choice([-1, 1], int(mask.sum()))
    a[:, 40:48] = np.float32(2.0**-63) * rng.uniform(1, 2, (rows, 8)).astype(np.float32)
    b[40:48, :] = np.float32(2.0**-63) * rng.uniform(1, 2, (8, N)).astype(np.float32)
    a[:, 80:88][rng.random((rows, 8)) < 0.01] = np.inf
    b[8:16][rng.random((8, N)) < 0.01] = np.float32(1e-41)
    m = MB.from_lut(random_lut(M, rng), M)
    stored = np.asarray(m.lut)
    fn = lambda x, w: _api("approx_dot")(x, w, m)  # noqa: E731
    want = sequential_gemm(a, b, stored, M)
    assert_bits_equal(run_on(GPU, fn, a, b), want, f"edges M={M}")
    monkeypatch.setenv("APPROX_JAX_CUDA_EXPANDED", "0")
    assert_bits_equal(run_on(GPU, fn, a, b), want, f"edges M={M} LUT kernel")


@needs_real_gpu
def test_gemm_expanded_kernel_stacked_and_split_k(monkeypatch):
    # Stacked designs (Lt restaged per design), batched operands and a forced
    # split-K in both execution modes.
    rng = np.random.default_rng(4000)
    stacked = MB.stack([MB.mbm(7), MB.from_lut(random_lut(7, rng), 7), MB.mitchell(5)])
    a = random_operands((3, 70, 600), rng)
    b = random_operands((600, 90), rng)
    stored = np.asarray(stacked.lut)
    matmul = _api("approx_matmul")
    for want_chunks in ("1", "3"):
        monkeypatch.setenv("APPROX_JAX_CUDA_SPLIT_K", want_chunks)
        got = run_on(GPU, lambda x, w: matmul(x, w, stacked), a, b)
        assert got.shape == (3, 3, 70, 90)
        for d in range(3):
            for i in (0, 2):
                want = chunked_gemm(a[i], b, stored[d], stacked.mbits, int(want_chunks))
                assert_bits_equal(got[d, i], want, f"design {d} batch {i} split {want_chunks}")


@pytest.mark.parametrize("M", (2, 3, 5, 7))
def test_gemm_expanded_narrow_planes(M, monkeypatch):
    # A LUT that is a narrower one widened to M (mbm(M), whose forced low bit
    # makes the last index bit irrelevant; a design widened to a stack's
    # width) is expanded into 2^M' planes for its effective index width M'
    # (checked on the device per call); APPROX_JAX_CUDA_NARROW=0 expands all
    # 2^M. Both give the sequential reference's bits, per design of a stack
    # mixing widths.
    rng = np.random.default_rng(6000 + M)
    a = random_operands((300, 70), rng, exp_range=40)
    b = random_operands((70, 130), rng, exp_range=40)
    stacked = MB.stack(
        [
            MB.mbm(M),
            MB.from_lut(random_lut(M - 1, rng), M - 1),
            MB.from_lut(random_lut(M, rng), M),
        ]
    )
    stored = np.asarray(stacked.lut)
    fn = _api("approx_dot")
    for narrow in ("1", "0"):
        monkeypatch.setenv("APPROX_JAX_CUDA_NARROW", narrow)
        got = run_on(GPU, lambda x, w: fn(x, w, stacked), a, b)
        for d in range(3):
            want = sequential_gemm(a, b, stored[d], M)
            assert_bits_equal(got[d], want, f"design {d} M={M} narrow={narrow}")
        single = run_on(GPU, lambda x, w: fn(x, w, MB.mbm(M)), a, b)
        assert_bits_equal(single, got[0], f"mbm{M} alone narrow={narrow}")


# --------------------------------------------------------------------------
# M >= 8: the LUT kernel reads its LUT from global memory, or computes each
# entry when the design's LUT equals a built-in family's closed form (checked
# on the device per call). Both must give the LUT's bits.


@pytest.mark.parametrize("M", (8, 11))
def test_gemm_closed_forms_give_the_lut_bits(M, monkeypatch):
    rng = np.random.default_rng(5000 + M)
    a = random_operands((70, 300), rng, specials=0.01)
    b = random_operands((300, 90), rng, specials=0.01)
    near_mbm = np.array(MB.mbm(M).lut)
    near_mbm[(5 << M) | 9] ^= 1  # one entry off: no closed form applies
    designs = [
        ("mbm", MB.mbm(M)),
        ("mitchell", MB.mitchell(M)),
        ("truncate", MB.truncate(M)),
        ("near-mbm", MB.from_lut(near_mbm, M)),
    ]
    fn = _api("approx_dot")
    for name, m in designs:
        want = sequential_gemm(a, b, np.asarray(m.lut), M)
        got = run_on(GPU, lambda x, w, m=m: fn(x, w, m), a, b)
        assert_bits_equal(got, want, f"{name}{M} closed form")
        monkeypatch.setenv("APPROX_JAX_CUDA_FORMULA", "0")
        assert_bits_equal(run_on(GPU, lambda x, w, m=m: fn(x, w, m), a, b), want, f"{name}{M} LUT")
        monkeypatch.delenv("APPROX_JAX_CUDA_FORMULA")
    # A stack mixing families and a LUT without a closed form: one call.
    stacked = MB.stack([m for _, m in designs])
    got = run_on(GPU, lambda x, w: fn(x, w, stacked), a, b)
    for d, (name, m) in enumerate(designs):
        want = sequential_gemm(a, b, np.asarray(m.lut), M)
        assert_bits_equal(got[d], want, f"stacked {name}{M}")
