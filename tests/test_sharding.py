"""Sharding of the approx_jax custom calls (custom_partitioning, shard_map).

Every scenario runs in a fresh ``python`` subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (the device count is
fixed when JAX initialises, and the other test files share this process).
Each script prints one JSON line that the test asserts on.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import textwrap

import pytest
from approx_test_utils import xla_flags

import approx_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Subprocesses import the approx_jax this test imported (the installed package
# in CI, the source tree in a developer build), and run outside the checkout so
# `python -c` (which puts the working directory first) cannot shadow it.
PACKAGE_PARENT = str(pathlib.Path(approx_jax.__file__).resolve().parents[1])

_PRELUDE = textwrap.dedent(
    """
    import json, os, re
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P, AxisType
    from approx_jax._src import ops, partitioning as pt, multipliers as ml, ffi
    assert len(jax.devices()) == 4, jax.devices()
    M = ml.mbm(7)
    KLUT = ops.kernel_lut_of(M)
    RNG = np.random.default_rng(0)
    R = {}

    def randn(*shape):
        return RNG.standard_normal(shape, np.float32)

    def mesh_of(kind):
        t = AxisType.Explicit if kind == "explicit" else AxisType.Auto
        return jax.make_mesh((4,), ("data",), axis_types=(t,))

    def compiled(f, *args):
        c = jax.jit(f).lower(*args).compile()
        return c, c.as_text()

    def collectives(txt):
        pat = r"\\b(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)\\b"
        return sorted(set(re.findall(pat, txt)))

    def gemm_shapes(txt):
        # Result shapes of the approx_jax_gemm custom calls (per-device shapes).
        pat = r"= (f32\\[[0-9,]*\\])[^=]*custom_call_target=\\"approx_jax_gemm"
        return sorted(set(re.findall(pat, txt)))

    def same(x, y):
        return bool(np.array_equal(np.asarray(x), np.asarray(y)))

    def maxdiff(x, y):
        return float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
    """
)


def _run(body: str, timeout: int = 240, extra_env: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(extra_env or {})
    env["XLA_FLAGS"] = xla_flags("--xla_force_host_platform_device_count=4")
    env["PYTHONPATH"] = PACKAGE_PARENT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("JAX_PLATFORMS", "cpu")
    code = _PRELUDE + textwrap.dedent(body) + "\nprint('RESULT ' + json.dumps(R))\n"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=tempfile.gettempdir(),
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise AssertionError(
            f"subprocess failed (rc={proc.returncode}):\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.fixture(scope="module", autouse=True)
def _kernels_built():
    from approx_jax._src import ffi

    if "cpu" not in ffi.registered_platforms():
        pytest.skip("native kernels not built")


@pytest.mark.parametrize("partitioner", ["shardy", "gspmd"])
def test_partitioned_custom_calls_stay_local(partitioner):
    """Cases (1)-(4), (6) on the raw partitioned calls, plus the fallback.

    Shardy (jax's default) uses the sharding rule; the legacy GSPMD
    partitioner uses ``infer_sharding_from_operands``.
    """
    shardy = "true" if partitioner == "shardy" else "false"
    r = _run(
        extra_env={"JAX_USE_SHARDY_PARTITIONER": shardy},
        body="""
        mesh = mesh_of("auto")
        rows = NamedSharding(mesh, P(None, None, "data", None))
        last = NamedSharding(mesh, P(None, None, None, "data"))
        batch = NamedSharding(mesh, P(None, "data"))
        rep = NamedSharding(mesh, P())
        gemm = lambda a, b: pt.gemm_call(a, b, KLUT, 7)

        def case(name, f, args, shardings, ref):
            args = [jax.device_put(x, s) for x, s in zip(args, shardings)]
            c, txt = compiled(f, *args)
            out = c(*args)
            R[name] = dict(colls=collectives(txt), same=same(out, ref), diff=maxdiff(out, ref),
                           shapes=gemm_shapes(txt), spec=str(out.sharding.spec))

        a, b = randn(1, 1, 32, 16), randn(1, 1, 16, 8)
        case("dense_fwd", gemm, [a, b], [rows, rep], ffi.gemm_call(a, b, KLUT, 7))
        g, w = randn(1, 1, 32, 8), randn(1, 1, 16, 8)
        wt = np.swapaxes(w, -1, -2).copy()
        case("input_grad", gemm, [g, wt], [rows, rep], ffi.gemm_call(g, wt, KLUT, 7))
        xt = np.swapaxes(a, -1, -2).copy()
        case("weight_grad", gemm, [xt, g], [last, rows], ffi.gemm_call(xt, g, KLUT, 7))
        A, B = randn(1, 8, 4, 16), randn(1, 8, 16, 4)
        case("batched", gemm, [A, B], [batch, batch], ffi.gemm_call(A, B, KLUT, 7))
        Bb = randn(1, 1, 16, 4)  # size-1 broadcast batch axis on b
        case("batched_bcast", gemm, [A, Bb], [batch, rep], ffi.gemm_call(A, Bb, KLUT, 7))
        u, v = randn(1, 64), randn(1, 64)
        case("multiply", lambda a, b: pt.multiply_call(a, b, KLUT, 7), [u, v],
             [NamedSharding(mesh, P(None, "data"))] * 2, ffi.multiply_call(u, v, KLUT, 7))
        # Conflicting layout (m and n on the same mesh axis): falls back.
        case("conflict", gemm, [a, b], [rows, last], ffi.gemm_call(a, b, KLUT, 7))
        """,
    )
    for name in ("dense_fwd", "input_grad", "batched", "batched_bcast", "multiply"):
        assert r[name]["colls"] == [], (name, r[name])
        assert r[name]["same"], (name, r[name])
    assert r["dense_fwd"]["shapes"] == ["f32[1,1,8,8]"]
    assert r["dense_fwd"]["spec"] == "P(None, None, 'data', None)"
    assert r["input_grad"]["shapes"] == ["f32[1,1,8,16]"]
    assert r["batched"]["shapes"] == ["f32[1,2,4,4]"]
    assert r["batched_bcast"]["shapes"] == ["f32[1,2,4,4]"]
    # Weight gradient: local partial products over a quarter of the
    # contraction each, then one all-reduce; never an all-gather.
    assert r["weight_grad"]["colls"] == ["all-reduce"], r["weight_grad"]
    assert r["weight_grad"]["shapes"] == ["f32[1,1,16,8]"]
    assert r["weight_grad"]["diff"] < 1e-4
    assert r["conflict"]["same"], r["conflict"]


@pytest.mark.parametrize("kind", ["auto", "explicit"])
def test_dense_jit_batch_sharded_no_allgather(kind):
    """approx_dot forward + both gradients under plain jit, batch-sharded x."""
    r = _run(
        f"""
        kind = {kind!r}
        x, w = randn(32, 16), randn(16, 8)

        def loss(w, x):
            return jnp.sum(jnp.tanh(ops.approx_dot(x, w, M)))

        def f(w, x):
            return ops.approx_dot(x, w, M), jax.grad(loss, argnums=(0, 1))(w, x)

        ref = jax.jit(f)(w, x)
        mesh = mesh_of(kind)
        with jax.set_mesh(mesh):
            xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
            wr = jax.device_put(w, NamedSharding(mesh, P()))
            c, txt = compiled(f, wr, xs)
            y, (dw, dx) = c(wr, xs)
        R.update(colls=collectives(txt), shapes=gemm_shapes(txt), y=same(y, ref[0]),
                 dx=same(dx, ref[1][1]), dw=maxdiff(dw, ref[1][0]),
                 y_spec=str(y.sharding.spec))
        """
    )
    assert r["colls"] == ["all-reduce"], r  # the weight-gradient all-reduce only
    assert r["shapes"] == ["f32[1,1,16,8]", "f32[1,1,8,16]", "f32[1,1,8,8]"], r
    assert r["y"] and r["dx"], r
    assert r["dw"] < 1e-4, r
    assert "data" in r["y_spec"]


@pytest.mark.parametrize("partitioner", ["shardy", "gspmd"])
@pytest.mark.parametrize("kind", ["auto", "explicit"])
def test_conv_batch_sharded_in_place_forward(kind, partitioner):
    """approx_conv under jit, batch-sharded input: the CPU forward's in-place
    patch GEMM (approx_jax_conv) runs on each device's samples, no all-gather."""
    shardy = "true" if partitioner == "shardy" else "false"
    r = _run(
        extra_env={"JAX_USE_SHARDY_PARTITIONER": shardy},
        body=f"""
        from approx_jax._src import conv as conv_lib
        kind = {kind!r}
        x, w = randn(8, 9, 9, 16), randn(3, 3, 16, 12)

        def loss(w, x):
            return jnp.sum(jnp.tanh(conv_lib.approx_conv(x, w, M, padding="SAME")))

        def f(w, x):
            y = conv_lib.approx_conv(x, w, M, (2, 1), "VALID")
            return y, jax.grad(loss, argnums=(0, 1))(w, x)

        ref = jax.jit(f)(w, x)
        mesh = mesh_of(kind)
        with jax.set_mesh(mesh):
            xs = jax.device_put(x, NamedSharding(mesh, P("data")))
            wr = jax.device_put(w, NamedSharding(mesh, P()))
            c, txt = compiled(f, wr, xs)
            y, (dw, dx) = c(wr, xs)
        pat = r'= (f32\\[[0-9,]*\\])[^=]*custom_call_target=\\"approx_jax_conv'
        wpat = r'= (f32\\[[0-9,]*\\])[^=]*custom_call_target=\\"approx_jax_conv_wgrad'
        R.update(colls=collectives(txt), conv_shapes=sorted(set(re.findall(pat + '"', txt))),
                 wgrad_shapes=sorted(set(re.findall(wpat, txt))),
                 y=same(y, ref[0]), dx=same(dx, ref[1][1]), dw=maxdiff(dw, ref[1][0]),
                 y_spec=str(y.sharding.spec))
        """,
    )
    assert r["colls"] == ["all-reduce"], r  # the kernel-gradient all-reduce only
    # Per device: 2 of the 8 samples ([D, G, N, P, O]), forward and the input
    # gradient (a conv of dy back onto the 16 input channels); the kernel
    # gradient of each device's samples ([D, G, taps * C, O]), then the all-reduce.
    assert r["conv_shapes"] == ["f32[1,1,2,28,12]", "f32[1,1,2,81,12]", "f32[1,1,2,81,16]"], r
    assert r["wgrad_shapes"] == ["f32[1,1,144,12]"], r
    assert r["y"] and r["dx"], r
    assert r["dw"] < 1e-3, r
    assert "data" in r["y_spec"]


def test_strided_conv_input_gradient_batch_sharded():
    """A stride-2 conv's input gradient (one conv of dy per phase) on a
    batch-sharded input: each device's samples, no all-gather, same bits."""
    r = _run(
        """
        from approx_jax._src import conv as conv_lib
        x, w = randn(8, 9, 10, 8), randn(3, 3, 8, 6)

        def grads(x, w):
            loss = lambda x, w: jnp.sum(jnp.tanh(
                conv_lib.approx_conv(x, w, M, window_strides=2, padding="SAME")))
            return jax.grad(loss, argnums=(0, 1))(x, w)

        ref = jax.jit(grads)(x, w)
        mesh = mesh_of("auto")
        with jax.set_mesh(mesh):
            xs = jax.device_put(x, NamedSharding(mesh, P("data")))
            c, txt = compiled(grads, xs, w)
            dx, dw = c(xs, w)
        pat = r'= (f32\\[[0-9,]*\\])[^=]*custom_call_target=\\"approx_jax_conv"'
        R.update(colls=collectives(txt), shapes=sorted(set(re.findall(pat, txt))),
                 dx=same(dx, ref[0]), dw=maxdiff(dw, ref[1]))
        """
    )
    assert r["colls"] == ["all-reduce"], r  # the kernel-gradient all-reduce only
    # Per device 2 samples: the forward [D, G, N, 5 * 5, O] and the 4 phases
    # of the input gradient, [D, G, N, rows * cols of the phase, C]: rows 5
    # or 4 of the 9, columns 5 of the 10.
    assert r["shapes"] == ["f32[1,1,2,20,8]", "f32[1,1,2,25,6]", "f32[1,1,2,25,8]"], r
    assert r["dx"], r
    assert r["dw"] < 1e-3, r


@pytest.mark.parametrize("kind", ["auto", "explicit"])
def test_matmul_and_multiply_batch_sharded(kind):
    """Attention-style batched matmul and elementwise multiply."""
    r = _run(
        f"""
        mesh = mesh_of({kind!r})
        A, B = randn(8, 2, 4, 16), randn(8, 2, 16, 4)
        u, v = randn(64, 3), randn(64, 3)

        def f(A, B):
            l = lambda A, B: jnp.sum(jnp.sin(ops.approx_matmul(A, B, M)))
            return ops.approx_matmul(A, B, M), jax.grad(l, argnums=(0, 1))(A, B)

        def g(u, v):
            l = lambda u, v: jnp.sum(jnp.sin(ops.multiply(u, v, M)))
            return ops.multiply(u, v, M), jax.grad(l, argnums=(0, 1))(u, v)

        for name, fn, args in (("matmul", f, (A, B)), ("multiply", g, (u, v))):
            ref = jax.jit(fn)(*args)
            with jax.set_mesh(mesh):
                sh = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in args]
                try:
                    c, txt = compiled(fn, *sh)
                except Exception as e:
                    R[name] = dict(err=str(e)[:300])
                    continue
                out = c(*sh)
            R[name] = dict(colls=collectives(txt), same=all(
                same(a, b) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref))))
        """
    )
    errs = [r[n]["err"] for n in ("matmul", "multiply") if "err" in r[n]]
    assert not errs, errs
    for name in ("matmul", "multiply"):
        assert r[name]["colls"] == [], r
        assert r[name]["same"], r


@pytest.mark.parametrize("kind", ["auto", "explicit"])
def test_grad_of_replicated_operand_broadcast_against_sharded_one(kind):
    """A replicated operand broadcast against a batch-sharded one (a bias-like
    ``[K]`` factor of ``multiply``, a ``[1, H, K, N]`` ``approx_matmul``
    operand, a scalar under ``approximate(elementwise=True)``): its cotangent
    is computed from the sharded operand, and under Explicit axes the backward
    rule must hand it back with the primal's (replicated) type. Gradients equal
    the unsharded ones bit for bit, eager and jitted."""
    r = _run(
        f"""
        import approx_jax
        mesh = mesh_of({kind!r})
        x, bias = randn(8, 12), randn(12)
        a4, b4 = randn(8, 2, 5, 12), randn(1, 2, 12, 5)
        scaled = approx_jax.approximate(lambda x, w: (x @ w) * 0.5, M, elementwise=True)
        cases = {{
            "multiply": (lambda x, b: jnp.sum(jnp.sin(ops.multiply(x, b, M))), x, bias),
            "matmul": (lambda a, b: jnp.sum(jnp.sin(ops.approx_matmul(a, b, M))), a4, b4),
            "scalar": (lambda x, w: jnp.sum(jnp.sin(scaled(x, w))), x, randn(12, 3)),
        }}
        for name, (f, u, v) in cases.items():
            ref = jax.grad(f, argnums=(0, 1))(u, v)
            su = jax.device_put(u, NamedSharding(mesh, P("data")))
            sv = jax.device_put(v, NamedSharding(mesh, P()))
            for mode, g in (("eager", jax.grad(f, argnums=(0, 1))),
                            ("jit", jax.jit(jax.grad(f, argnums=(0, 1))))):
                with jax.set_mesh(mesh):
                    try:
                        got = g(su, sv)
                    except Exception as e:
                        R[name + mode] = dict(err=str(e)[:300])
                        continue
                R[name + mode] = dict(
                    same=all(same(a, b) for a, b in zip(got, ref)),
                    v_spec=str(jax.typeof(got[1]).sharding.spec) if {kind!r} == "explicit" else "",
                )
        """
    )
    errs = {n: c["err"] for n, c in r.items() if "err" in c}
    assert not errs, errs
    assert len(r) == 6, r
    for case in r.values():
        assert case["same"], r
        if kind == "explicit":  # the replicated operand's gradient stays replicated
            assert "data" not in case["v_spec"], r


def test_explicit_mesh_arrays_without_set_mesh():
    """Arrays placed on an Explicit mesh (``jax.make_mesh``'s default) and passed
    to a jitted function outside ``jax.set_mesh``, as ``jnp.dot`` takes them:
    the canonical reshapes must not use a bare PartitionSpec."""
    r = _run(
        """
        mesh = mesh_of("explicit")
        x, w, A, B = randn(32, 16), randn(16, 8), randn(8, 2, 4, 16), randn(8, 2, 16, 4)
        stack = ml.stack([M, ml.mitchell(5)])
        cases = {
            "dot": (lambda x, w: ops.approx_dot(x, w, M), (x, w)),
            "dot_grad": (jax.grad(lambda w, x: jnp.sum(jnp.tanh(ops.approx_dot(x, w, M))),
                                  argnums=(0, 1)), (w, x)),
            "matmul": (lambda A, B: ops.approx_matmul(A, B, M), (A, B)),
            "multiply": (lambda u, v: ops.multiply(u, v, M), (x, x)),
            "stack": (lambda x, w: ops.approx_dot(x, w, stack), (x, w)),
        }
        for name, (fn, args) in cases.items():
            ref = jax.jit(fn)(*args)
            sh = [jax.device_put(a, NamedSharding(mesh, P("data")) if a.shape[0] % 4 == 0
                                 and a is not w else NamedSharding(mesh, P())) for a in args]
            try:
                out = jax.jit(fn)(*sh)
            except Exception as e:
                R[name] = dict(err=f"{type(e).__name__}: {str(e)[:300]}")
                continue
            leaves = list(zip(jax.tree.leaves(out), jax.tree.leaves(ref)))
            R[name] = dict(same=all(
                np.asarray(a).tobytes() == np.asarray(b).tobytes() for a, b in leaves
            ) if name != "dot_grad" else float(np.max(np.abs(
                np.asarray(out[0]) - np.asarray(ref[0])))) < 1e-4 and same(out[1], ref[1]))
        """
    )
    errs = {n: v["err"] for n, v in r.items() if "err" in v}
    assert not errs, errs
    assert all(v["same"] for v in r.values()), r


@pytest.mark.parametrize("kind", ["auto", "explicit"])
def test_shard_map_forward_and_grad(kind):
    """Inside shard_map the custom calls run on the per-device blocks."""
    r = _run(
        f"""
        kind = {kind!r}
        x, w = randn(32, 16), randn(16, 8)

        def loss(w, x):
            return jnp.sum(jnp.tanh(ops.approx_dot(x, w, M)))

        ref_y = ops.approx_dot(x, w, M)
        ref_dw, ref_dx = jax.jit(jax.grad(loss, argnums=(0, 1)))(w, x)
        mesh = mesh_of(kind)
        xs = jax.device_put(x, NamedSharding(mesh, P("data")))
        wr = jax.device_put(w, NamedSharding(mesh, P()))

        def body(w, x):
            # The weight is made device-varying explicitly so that its
            # per-device gradient is a local value; psum makes it global.
            wv = jax.lax.pcast(w, "data", to="varying")
            dw, dx = jax.grad(loss, argnums=(0, 1))(wv, x)
            return ops.approx_dot(x, w, M), jax.lax.psum(dw, "data"), dx

        fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P("data")),
                                   out_specs=(P("data"), P(), P("data"))))
        y, dw, dx = fn(wr, xs)
        R.update(y=same(y, ref_y), dx=same(dx, ref_dx), dw=maxdiff(dw, ref_dw),
                 colls=collectives(fn.lower(wr, xs).compile().as_text()))
        # Invariant (replicated) weight straight into the custom_vjp.
        def body2(w, x):
            return jax.grad(loss, argnums=(0, 1))(w, x)
        try:
            fn2 = jax.jit(jax.shard_map(body2, mesh=mesh, in_specs=(P(), P("data")),
                                        out_specs=(P(), P("data"))))
            dw2, dx2 = fn2(wr, xs)
            R.update(inv_ok=True, inv_dx=same(dx2, ref_dx), inv_dw=maxdiff(dw2, ref_dw))
        except Exception as e:
            R.update(inv_ok=False, inv_err=str(e)[:300])
        """
    )
    assert r["y"] and r["dx"], r
    assert r["dw"] < 1e-4, r
    assert r["colls"] == ["all-reduce"], r
    assert r["inv_ok"], r.get("inv_err")
    assert r["inv_dx"] and r["inv_dw"] < 1e-4, r


def test_shard_map_with_a_traced_wide_multiplier():
    """A multiplier passed into shard_map at M >= 10: its LUT facts call runs
    on each device's (replicated) LUT inside the manual region."""
    r = _run(
        """
        mesh = mesh_of("auto")
        x, w = randn(32, 16), randn(16, 8)
        m = ml.mitchell(10)

        def loss(w, x, m):
            return jnp.sum(jnp.tanh(ops.approx_dot(x, w, m)))

        def body(w, x, m):
            return ops.approx_dot(x, w, m), jax.grad(loss, argnums=1)(w, x, m)

        fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P("data"), P()),
                                   out_specs=(P("data"), P("data"))))
        y, dx = fn(w, x, m)
        txt = fn.lower(w, x, m).compile().as_text()
        R.update(y=same(y, ops.approx_dot(x, w, m)),
                 dx=same(dx, jax.jit(jax.grad(loss, argnums=1))(w, x, m)),
                 facts=txt.count('custom_call_target="approx_jax_lut_facts"'))
        """
    )
    assert r["y"] and r["dx"], r
    assert r["facts"] == 1, r


@pytest.mark.parametrize("batch", [64, 20, 28])
def test_conv_batch_sharded_chunked_backward_gathers_nothing(batch):
    """A batch large enough for the input gradient's chunks (LeNet-5's conv 2 on
    4 devices): the chunks must split along the devices' blocks.

    5 chunks of 13 (batch 64 padded to 65) used to make XLA all-gather the
    activations; 2 chunks of 10 of a batch of 20 failed to partition, 4 of 7
    of 28 all-gathered. A chunk now holds a multiple of the device count.
    """
    r = _run(
        f"""
        from approx_jax._src import conv as conv_lib
        x, w = randn({batch}, 14, 14, 32), randn(5, 5, 32, 32)

        def loss(x, w):
            return jnp.sum(conv_lib.approx_conv(x, w, M, padding="SAME") ** 2)

        f = jax.grad(loss, argnums=(0, 1))
        ref = jax.jit(f)(x, w)
        mesh = mesh_of("auto")
        xs = jax.device_put(x, NamedSharding(mesh, P("data")))
        wr = jax.device_put(w, NamedSharding(mesh, P()))
        c, txt = compiled(f, xs, wr)
        dx, dw = c(xs, wr)
        R.update(colls=collectives(txt), dx=same(dx, ref[0]),
                 dw=maxdiff(dw, ref[1]) / float(np.max(np.abs(np.asarray(ref[1])))))
        """
    )
    assert r["colls"] == ["all-reduce"], r
    assert r["dx"] and r["dw"] < 1e-5, r  # the kernel gradient: summed per device, then reduced


@pytest.mark.parametrize("channels", [1, 4])
def test_shard_map_conv_grad(channels):
    """approx_conv's gradients inside shard_map with the batch sharded.

    The input gradient's fold used to be typed without the input's varying mesh
    axes ("cotangent type does not match function output").
    """
    r = _run(
        f"""
        from approx_jax._src import conv
        x, k = randn(8, 6, 6, {channels}), randn(3, 3, {channels}, 5)

        def loss(x, k):
            return jnp.sum(jnp.tanh(conv.approx_conv(x, k, M)))

        ref_dx, ref_dk = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, k)
        mesh = mesh_of("auto")

        def body(x, k):
            dx, dk = jax.grad(loss, argnums=(0, 1))(x, k)
            return dx, dk

        fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("data"), P()),
                                   out_specs=(P("data"), P())))
        dx, dk = fn(x, k)
        R.update(dx=same(dx, ref_dx), dk=maxdiff(dk, ref_dk))
        """
    )
    assert r["dx"], r
    assert r["dk"] < 1e-4, r


@pytest.mark.parametrize("mbits", [7, 11])
@pytest.mark.parametrize("kind", ["auto", "explicit"])
def test_vmap_over_designs_with_sharded_stack(kind, mbits):
    """A stack of designs sharded over devices: one design per device, no gather.

    At M = 11 the traced stack's LUT facts (one custom call, partitioned over
    the designs like the GEMMs) come with it, mbm10 widened among them.
    """
    r = _run(
        f"""
        kind = {kind!r}
        W = {mbits}
        last = ml.mbm(10) if W == 11 else ml.mbm(W)
        st = ml.stack([ml.mbm(W), ml.mitchell(W), ml.truncate(W), last])
        x, w = randn(32, 16), randn(16, 8)

        def loss(w, x, m):
            return jnp.sum(jnp.tanh(ops.approx_dot(x, w, m)))

        def f(w, x, m):
            return ops.approx_dot(x, w, m), jax.grad(loss, argnums=(0, 1))(w, x, m)

        ref = jax.jit(f)(w, x, st)
        mesh = mesh_of(kind)
        with jax.set_mesh(mesh):
            sst = jax.device_put(st, NamedSharding(mesh, P("data")))
            rep = NamedSharding(mesh, P())
            wr, xr = jax.device_put(w, rep), jax.device_put(x, rep)
            c, txt = compiled(f, wr, xr, sst)
            out = c(wr, xr, sst)
        # Also vmap explicitly over the (sharded) stack.
        g = jax.jit(jax.vmap(lambda m: ops.approx_dot(x, w, m)))
        with jax.set_mesh(mesh):
            yv = g(sst)
        singles = ml.unstack(st)
        R.update(colls=collectives(txt), shapes=gemm_shapes(txt),
                 y=same(out[0], ref[0]), dx=same(out[1][1], ref[1][1]),
                 dw=maxdiff(out[1][0], ref[1][0]), spec=str(out[0].sharding.spec),
                 vmap=same(yv, ref[0]),
                 alone=all(same(ref[0][d], ops.approx_dot(x, w, m)) for d, m in enumerate(singles)),
                 facts=txt.count('custom_call_target="approx_jax_lut_facts"'))
        """
    )
    assert r["alone"], r
    assert r["facts"] == (1 if mbits >= 10 else 0), r
    assert "all-gather" not in r["colls"], r
    # One design per device: the kernels see a design axis of size 1.
    assert r["shapes"] == ["f32[1,1,16,8]", "f32[1,1,32,16]", "f32[1,1,32,8]"], r
    assert r["y"] and r["dx"] and r["vmap"], r
    assert r["dw"] < 1e-4, r
    assert r["spec"].startswith("P('data'"), r


def test_reshape_keeps_explicit_sharding():
    r = _run(
        """
        mesh = mesh_of("explicit")
        cases = [((8, 2, 4, 16), P("data"), (1, 16, 4, 16)), ((64, 3), P("data"), (1, -1)),
                 ((1, 192), P(None, "data"), (64, 3)), ((32, 16), P("data"), (1, 1, 32, 16)),
                 ((3, 8, 5), P(None, "data"), (24, 5)), ((6, 4, 5), P(None, "data"), (2, 3, 20))]
        out = []
        with jax.set_mesh(mesh):
            for shape, spec, new in cases:
                x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
                xs = jax.device_put(x, NamedSharding(mesh, spec))
                y = jax.jit(lambda x: pt.reshape(x, new))(xs)
                out.append([same(y, x.reshape(new)), str(jax.typeof(y).sharding.spec)])
        R["cases"] = out
        """
    )
    got = r["cases"]
    assert all(ok for ok, _ in got), got
    assert got[0][1] == "P(None, 'data', None, None)"
    assert got[1][1] == "P(None, 'data')"
    assert got[2][1] == "P('data', None)"
    assert got[3][1] == "P(None, None, 'data', None)"
    assert got[4][1] == "P(None, None)"  # not expressible: replicated
    assert got[5][1] == "P(None, None, 'data')"


def test_parallel_helpers():
    r = _run(
        """
        from approx_jax._src import parallel
        mesh = parallel.data_parallel_mesh()
        R["axes"] = [list(mesh.axis_names), list(mesh.shape.values()), str(mesh.axis_types)]
        x, y = parallel.shard_batch((randn(8, 3), np.arange(8)), mesh)
        R["batch"] = [str(x.sharding.spec), str(y.sharding.spec), list(x.shape)]
        params = parallel.replicate({"w": randn(3, 2), "m": M}, mesh)
        R["rep"] = [str(params["w"].sharding.spec), params["w"].sharding.is_fully_replicated,
                    params["m"].lut.sharding.is_fully_replicated]
        two = parallel.data_parallel_mesh(2, axis_name="dp")
        R["two"] = [list(two.axis_names), two.devices.size]
        errs = []
        for bad in (lambda: parallel.shard_batch(randn(6, 3), mesh),
                    lambda: parallel.data_parallel_mesh(9),
                    lambda: parallel.shard_batch(np.float32(1.0), mesh)):
            try:
                bad()
                errs.append(None)
            except ValueError as e:
                errs.append(str(e)[:80])
        R["errs"] = errs
        """
    )
    assert r["axes"][0] == ["data"] and r["axes"][1] == [4] and "Auto" in r["axes"][2]
    assert r["batch"][0] == "P('data',)" and r["batch"][2] == [8, 3]
    assert r["rep"][1] and r["rep"][2]
    assert r["two"] == [["dp"], 2]
    assert all(e is not None for e in r["errs"]), r["errs"]


def test_data_parallel_mesh_rejects_non_int():
    from jax.sharding import AxisType

    from approx_jax._src import parallel

    # int(2.7) used to build a 2-device mesh silently.
    for bad in (2.7, "2", True):
        with pytest.raises(TypeError, match="num_devices must be an int"):
            parallel.data_parallel_mesh(bad)
    with pytest.raises(ValueError, match="axis_type"):
        parallel.data_parallel_mesh(1, axis_type=AxisType.Manual)


def test_explicit_mesh_layers_models_and_design_constants():
    """Explicit axes: a 3-D batch-sharded input through approx_dot_general (the
    nn layers' hook) and einsum, LeNet-5's max pool, and a vmapped product of a
    closed-over constant with design-sharded kernels (each raised)."""
    r = _run(
        """
        import approx_jax, approx_jax.nn as ann
        from approx_jax import models, parallel
        mesh = parallel.data_parallel_mesh(4, axis_type=AxisType.Explicit)
        x, w = randn(8, 16, 64), randn(64, 32)
        xs = parallel.shard_batch(jnp.asarray(x), mesh)
        dn = (((2,), (0,)), ((), ()))
        cases = {
            "dot_general": (lambda x: ann.approx_dot_general(x, w, dn, M), x, xs),
            "einsum": (lambda x: approx_jax.einsum("bld,dk->blk", x, w, multiplier=M), x, xs),
        }
        lenet = models.create("lenet5")
        p = lenet.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
        img = randn(8, 28, 28, 1)
        cases["lenet5"] = (lambda x: lenet.apply(p, x, M), img, parallel.shard_batch(img, mesh))
        for name, (f, ref_in, sharded_in) in cases.items():
            try:
                R[name] = same(jax.jit(f)(sharded_in), jax.jit(f)(ref_in))
            except Exception as e:
                R[name] = f"{type(e).__name__}: {str(e)[:200]}"
        dm = jax.make_mesh((4,), ("design",), axis_types=(AxisType.Explicit,))
        stack = ml.stack(["mbm7", "mitchell7", "mbm5", "mitchell5"])
        ws, x0 = randn(4, 64, 32), jnp.asarray(x[0])
        f = jax.vmap(lambda w, m: ops.approx_dot(x0, w, m))
        ref = jax.jit(f)(ws, stack)
        put = lambda a: jax.device_put(a, NamedSharding(dm, P("design")))
        try:
            R["design_constant"] = same(jax.jit(f)(put(ws), put(stack)), ref)
        except Exception as e:
            R["design_constant"] = f"{type(e).__name__}: {str(e)[:200]}"
        """
    )
    assert all(v is True for v in r.values()), r


def test_data_parallel_example_matches_single_device():
    env = dict(os.environ)
    env["PYTHONPATH"] = PACKAGE_PARENT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["XLA_FLAGS"] = xla_flags()  # the example sets the device count itself
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "data_parallel.py"),
            "--steps",
            "2",
            "--batch-size",
            "16",
            "--devices",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=tempfile.gettempdir(),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "MATCH" in proc.stdout, proc.stdout


def test_explicit_mesh_conv_kernel_sharded_on_output_channels():
    """The kernel's reshapes keep an Explicit out-channel sharding (a plain
    reshape raised ShardingTypeError on jax 0.10)."""
    r = _run(
        """
        from approx_jax._src import conv as conv_lib
        mesh = jax.make_mesh((2, 2), ("a", "b"), axis_types=(AxisType.Explicit,) * 2)
        img, ker = randn(4, 8, 8, 4), randn(3, 3, 4, 8)
        f = lambda i, k: conv_lib.approx_conv(i, k, M, padding="SAME")
        ref = jax.jit(f)(img, ker)
        with jax.set_mesh(mesh):
            i = jax.device_put(img, NamedSharding(mesh, P("a")))
            k = jax.device_put(ker, NamedSharding(mesh, P(None, None, None, "b")))
            try:
                out = jax.jit(f)(i, k)
                R.update(same=same(out, ref), spec=str(out.sharding.spec))
            except Exception as e:
                R.update(err=f"{type(e).__name__}: {str(e)[:200]}")
        """
    )
    assert r.get("same"), r
