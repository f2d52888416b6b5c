"""Determinism (SPEC section 5: same inputs, same thread count -> same bits).

* repeated runs in one process give identical bits (eager and jit);
* the CPU kernels give identical bits with 1 and with N intra-op threads. The
  intra-op pool size that ``ffi::ThreadPool::num_threads()`` reports follows
  the process's CPU affinity (``taskset -c 0`` -> 1; ``XLA_FLAGS=
  --xla_cpu_multi_thread_eigen=false`` does *not* change it), so the same
  computation runs in subprocesses with and without ``taskset -c 0``; a tiny
  probe FFI handler (compiled here from the jaxlib headers) reports the pool
  size each subprocess really had;
* several Python threads calling the same jitted functions concurrently get
  the serial results.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from approx_test_utils import xla_flags

import approx_jax
from approx_jax._src import multipliers as mult
from approx_jax._src import ops as _ops

try:
    from approx_jax._src.conv import approx_conv
except ImportError:
    approx_conv = None


def _public(name):
    return getattr(approx_jax, name, None) or getattr(_ops, name)


multiply = _public("multiply")
approx_dot = _public("approx_dot")
approx_matmul = _public("approx_matmul")


def bits(x) -> bytes:
    return np.ascontiguousarray(np.asarray(x, np.float32)).view(np.uint32).tobytes()


def values(shape, seed, spread=8):
    """Finite float32 values over a moderate exponent range, plus some zeros."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * np.exp2(rng.integers(-spread, spread + 1, shape))
    x[rng.random(shape) < 0.02] = 0.0
    return x.astype(np.float32)


# --------------------------------------------------------------------------
# Workload shared by the in-process and the subprocess tests: large enough
# that the CPU kernels split it into many tasks.

WORKLOAD = textwrap.dedent(
    """
    import numpy as np, jax, jax.numpy as jnp
    import approx_jax
    from approx_jax._src import multipliers as mult, ops as _ops

    def _public(name):
        return getattr(approx_jax, name, None) or getattr(_ops, name)

    multiply = _public("multiply")
    approx_dot = _public("approx_dot")
    approx_matmul = _public("approx_matmul")

    def values(shape, seed, spread=8):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal(shape) * np.exp2(rng.integers(-spread, spread + 1, shape))
        x[rng.random(shape) < 0.02] = 0.0
        return x.astype(np.float32)

    def workload():
        m = mult.mbm(7)
        m11 = mult.truncate(11)
        stack = mult.stack([mult.mbm(5), mult.mitchell(6), mult.truncate(7)])
        x = values((523, 301), 1)
        w = values((301, 67), 2)
        a = values((3, 97, 129), 3)
        b = values((129, 45), 4)
        out = {}
        out["dot"] = approx_dot(x, w, m)
        out["dot_m11"] = approx_dot(x, w, m11)
        out["dot_stack"] = approx_dot(x[:200], w, stack)
        out["matmul"] = approx_matmul(a, b, m)
        out["multiply"] = multiply(values((70001,), 5), values((70001,), 6), m)
        out["multiply_stack"] = multiply(values((40001,), 7), values((40001,), 8), stack)
        g = values((523, 67), 9)
        for mode in ("approx", "exact"):
            _, vjp = jax.vjp(lambda p, q: approx_dot(p, q, m, backward=mode), x, w)
            dx, dw = vjp(jnp.asarray(g))
            out["dx_" + mode], out["dw_" + mode] = dx, dw
        fn = jax.jit(lambda p, q: approx_matmul(p, q, stack))
        out["jit_matmul_stack"] = fn(a, b)
        try:
            from approx_jax._src.conv import approx_conv
        except ImportError:
            approx_conv = None
        if approx_conv is not None:
            xc = values((4, 17, 17, 8), 10)
            wc = values((3, 3, 8, 16), 11)
            out["conv"] = approx_conv(xc, wc, m, padding="SAME")
            _, vjp = jax.vjp(lambda p, q: approx_conv(p, q, m, padding="SAME"), xc, wc)
            dxc, dwc = vjp(jnp.asarray(values((4, 17, 17, 16), 12)))
            out["conv_dx"], out["conv_dw"] = dxc, dwc
        return {k: np.asarray(v, np.float32) for k, v in out.items()}
    """
)

_namespace: dict = {}
exec(compile(WORKLOAD, "<determinism workload>", "exec"), _namespace)  # noqa: S102
workload = _namespace["workload"]


def digests(results) -> dict[str, str]:
    return {k: hashlib.sha256(bits(v)).hexdigest() for k, v in sorted(results.items())}


# --------------------------------------------------------------------------
# Repeated runs.


def test_repeated_runs_identical():
    first = digests(workload())
    for _ in range(2):
        assert digests(workload()) == first


def test_repeated_jit_and_eager_identical():
    m = mult.mitchell(7)
    x = values((257, 129), 20)
    w = values((129, 33), 21)
    eager = bits(approx_dot(x, w, m))
    fn = jax.jit(lambda p, q: approx_dot(p, q, m))
    for _ in range(5):
        assert bits(fn(x, w)) == eager
    # Operands donated/copied differently still give the same bits.
    assert bits(fn(jnp.asarray(x), jnp.asarray(w))) == eager
    assert bits(approx_dot(np.array(x, order="C"), w, m)) == eager


# --------------------------------------------------------------------------
# 1 vs N intra-op threads (subprocesses).

PROBE_SOURCE = r"""
#include <cstdint>
#include "xla/ffi/api/ffi.h"
namespace ffi = xla::ffi;
static ffi::Error Impl(ffi::ThreadPool pool, ffi::Result<ffi::Buffer<ffi::S32>> out) {
  out->typed_data()[0] = static_cast<int32_t>(pool.num_threads());
  return ffi::Error::Success();
}
XLA_FFI_DEFINE_HANDLER_SYMBOL(ApproxJaxTestNumThreads, Impl,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Ret<ffi::Buffer<ffi::S32>>());
"""

SUBPROCESS_MAIN = textwrap.dedent(
    """
    import ctypes, hashlib, json, os, sys
    probe = os.environ.get("APPROX_JAX_TEST_PROBE")
    num_threads = None
    if probe:
        import jax, jax.numpy as jnp
        lib = ctypes.cdll.LoadLibrary(probe)
        jax.ffi.register_ffi_target(
            "approx_jax_test_num_threads", jax.ffi.pycapsule(lib.ApproxJaxTestNumThreads),
            platform="cpu")
        num_threads = int(jax.ffi.ffi_call(
            "approx_jax_test_num_threads", jax.ShapeDtypeStruct((1,), jnp.int32))()[0])
    res = workload()
    out = {k: hashlib.sha256(v.view("uint32").tobytes()).hexdigest()
           for k, v in sorted(res.items())}
    print("RESULT " + json.dumps({"num_threads": num_threads, "digests": out}))
    """
)


@pytest.fixture(scope="module")
def thread_probe(tmp_path_factory):
    """Path of a compiled probe handler reporting ffi::ThreadPool::num_threads(), or None."""
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        return None
    out = tmp_path_factory.mktemp("probe")
    src = out / "probe.cc"
    src.write_text(PROBE_SOURCE)
    lib = out / "probe.so"
    cmd = [
        cxx,
        "-std=c++17",
        "-O1",
        "-shared",
        "-fPIC",
        "-w",
        "-I",
        jax.ffi.include_dir(),
        str(src),
        "-o",
        str(lib),
    ]
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        return None
    return lib


def run_workload(prefix: list[str], extra_env: dict[str, str], probe) -> dict:
    package_root = str(pathlib.Path(approx_jax.__file__).parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([package_root] + [p for p in sys.path if p])
    env.update(extra_env)
    if probe is not None:
        env["APPROX_JAX_TEST_PROBE"] = str(probe)
    code = WORKLOAD + SUBPROCESS_MAIN
    result = subprocess.run(
        prefix + [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
        cwd=package_root,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    line = [ln for ln in result.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@pytest.mark.slow
def test_same_bits_with_one_and_many_threads(thread_probe):
    if _cpus() < 2:
        pytest.skip("needs at least 2 CPUs to compare 1 vs N intra-op threads")
    taskset = shutil.which("taskset")
    if taskset is None:
        pytest.skip("taskset not available")
    many = run_workload([], {}, thread_probe)
    one = run_workload([taskset, "-c", "0"], {}, thread_probe)
    no_eigen_flags = {"XLA_FLAGS": xla_flags("--xla_cpu_multi_thread_eigen=false")}
    no_eigen = run_workload([], no_eigen_flags, thread_probe)
    if thread_probe is not None:
        # The comparison only means something if the pool sizes really differ.
        assert one["num_threads"] == 1, one["num_threads"]
        assert many["num_threads"] >= 2, many["num_threads"]
    in_process = digests(workload())
    assert many["digests"] == in_process
    for name in in_process:
        assert one["digests"][name] == in_process[name], f"{name}: 1 thread differs from N"
        assert no_eigen["digests"][name] == in_process[name], f"{name}: differs without eigen pool"


# --------------------------------------------------------------------------
# Concurrent Python threads.


def test_concurrent_python_threads_match_serial():
    m = mult.mbm(6)
    stack = mult.stack([mult.mbm(4), mult.truncate(6)])
    x = values((300, 160), 30)
    w = values((160, 48), 31)
    a = values((2, 64, 96), 32)
    b = values((96, 40), 33)
    g = values((300, 48), 34)
    fns = {
        "dot": jax.jit(lambda p, q: approx_dot(p, q, m)),
        "matmul_stack": jax.jit(lambda p, q: approx_matmul(p, q, stack)),
        "multiply": jax.jit(lambda p, q: multiply(p, q, m)),
        "grad": jax.jit(jax.grad(lambda p, q: jnp.sum(approx_dot(p, q, m) * g), argnums=(0, 1))),
    }
    args = {"dot": (x, w), "matmul_stack": (a, b), "multiply": (x, x[::-1]), "grad": (x, w)}

    def run(name):
        out = fns[name](*args[name])
        leaves = jax.tree_util.tree_leaves(out)
        return b"".join(bits(leaf) for leaf in leaves)

    serial = {name: run(name) for name in fns}
    errors: list[str] = []
    barrier = threading.Barrier(4)

    def worker(tid: int):
        try:
            barrier.wait()
            names = sorted(fns)
            for i in range(12):
                name = names[(tid + i) % len(names)]
                if run(name) != serial[name]:
                    errors.append(f"thread {tid} call {i}: {name} differs from the serial result")
        except Exception as e:  # noqa: BLE001 - report, do not hang
            errors.append(f"thread {tid}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    assert not errors, "\n".join(errors[:10])


def test_concurrent_eager_calls_match_serial():
    """Eager calls (each its own dispatch) from several threads, mixed shapes."""
    m = mult.truncate(5)
    problems = [(values((n, 37), 40 + n), values((37, 19), 41)) for n in (1, 7, 33, 65)]
    serial = [bits(approx_dot(p, q, m)) for p, q in problems]
    errors: list[str] = []

    def worker(tid: int):
        try:
            for i in range(8):
                k = (tid + i) % len(problems)
                if bits(approx_dot(*problems[k], m)) != serial[k]:
                    errors.append(f"thread {tid}: problem {k} differs")
        except Exception as e:  # noqa: BLE001
            errors.append(f"thread {tid}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, "\n".join(errors[:10])
