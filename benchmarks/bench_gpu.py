"""GPU speed of approximate GEMM, conv and train steps vs native XLA ops.

Median wall time (after warm-up, ``block_until_ready``, several reps) of each
approximate op and of its native counterpart on the first GPU, and their
ratio (approx / native = slowdown). Writes ``$OUT/bench_gpu.json`` (``OUT``
defaults to ``./bench_out``). Every section is guarded: a missing piece of the
package prints ``n/a`` instead of stopping the script. Sized to finish in well
under 4 minutes on an H200.

Usage:
  python benchmarks/bench_gpu.py [--quick] [--mbits 3,5,7,11]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _designs import random_design  # noqa: E402
from _timing import alternating_medians, block  # noqa: E402

ROWS: list[dict] = []
T_START = time.perf_counter()
# The JSON file and the run's description, rewritten after every row (main):
# a run cut short by its time limit still leaves what it measured.
JSON_OUT: dict = {}


def median_time(fn, reps: int, warmup: int = 1, budget_s: float = 20.0) -> float:
    """Median seconds of ``fn()`` (reps reduced if one call is slow)."""
    for _ in range(warmup):
        block(fn())
    samples = []
    t_all = time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        block(fn())
        samples.append(time.perf_counter() - t0)
        if time.perf_counter() - t_all > budget_s and len(samples) >= 2:
            break
    return statistics.median(samples)


def record(
    case: str,
    multiplier: str,
    approx_s,
    native_s,
    baseline: str,
    note: str = "",
    base: str | None = None,
    paired_default_s: float | None = None,
):
    """One result row; `base`: the case this row is an opt-in variant of, and
    `paired_default_s` the default's time measured alternately with it."""
    row = dict(
        case=case,
        multiplier=multiplier,
        baseline=baseline,
        approx_s=approx_s,
        native_s=native_s,
        note=note,
    )
    if base is not None:
        row["base"] = base
    if paired_default_s is not None:
        row["paired_default_s"] = paired_default_s
    if approx_s is not None and native_s:
        row["ratio"] = approx_s / native_s
    ROWS.append(row)
    write_json()
    ratio = f"{row['ratio']:.2f}x" if "ratio" in row else "n/a"
    a = f"{approx_s * 1e3:9.3f}" if approx_s is not None else "      n/a"
    n = f"{native_s * 1e3:9.3f}" if native_s is not None else "      n/a"
    print(
        f"{case:44s} {multiplier:8s} {a} ms  {baseline:14s} {n} ms  ratio {ratio:>8s} {note}",
        flush=True,
    )


def write_json() -> None:
    """(Re)writes the JSON results with every row so far (JSON_OUT set by main)."""
    if not JSON_OUT:
        return
    result = dict(JSON_OUT["meta"], elapsed_s=time.perf_counter() - T_START, rows=ROWS)
    tmp = JSON_OUT["path"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, JSON_OUT["path"])


def print_variant_summary():
    """Each opt-in variant's time against its default, to decide defaults.

    Against the default timed alternately with the variant (same noise)
    where there is one, else against the default's own row.
    """
    times = {(r["case"], r["multiplier"]): r["approx_s"] for r in ROWS if "base" not in r}
    lines = []
    for r in ROWS:
        base_t = r.get("paired_default_s") or times.get((r.get("base"), r["multiplier"]))
        if base_t and r["approx_s"]:
            speedup = base_t / r["approx_s"]
            verdict = "faster" if speedup > 1.03 else "slower" if speedup < 0.97 else "same"
            lines.append(f"  {r['case']:40s} {r['multiplier']:8s} {speedup:5.2f}x ({verdict})")
    if lines:
        print("opt-in variants, default time / variant time:")
        print("\n".join(lines))


def guarded(name):
    def deco(fn):
        def wrapper(*args, **kwargs):
            try:
                fn(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - keep the benchmark going
                traceback.print_exc()
                # (n/a: a piece this build lacks; anything else failed.)
                missing = isinstance(err, (ImportError, NotImplementedError))
                outcome = "n/a" if missing else "FAILED"
                record(name, "-", None, None, "-", f"{outcome} ({type(err).__name__}: {err})")

        return wrapper

    return deco


def _multipliers():
    import approx_jax

    mod = getattr(approx_jax, "multipliers", None)
    if mod is None or not hasattr(mod, "mbm"):
        from approx_jax._src import multipliers as mod
    return mod


def _op(name):
    import approx_jax

    fn = getattr(approx_jax, name, None)
    if fn is None:
        if name == "approx_conv":
            from approx_jax._src.conv import approx_conv as fn
        else:
            from approx_jax._src import ops

            fn = getattr(ops, name)
    return fn


def _paired_variant(run, knob: str, value: str, reps: int = 5) -> tuple[float, float]:
    """Median seconds of ``run()`` without and with an env knob, measured alternately.

    (Variants timed apart from their default, a median of 3 after it,
    followed the GPU's own drift: one native layer took 0.46 and 0.75 ms in
    two runs.)
    """

    def with_knob():
        with _env(knob, value):
            return run()

    times = alternating_medians({"default": run, "variant": with_knob}, reps=reps, warmup=1)
    return times["default"], times["variant"]


@contextlib.contextmanager
def _env(name: str, value: str):
    """Sets an environment knob the CUDA launcher reads at each launch."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@guarded("GEMM")
def bench_gemm(device, sizes, mbits_list, reps):
    approx_dot = _op("approx_dot")
    mb = _multipliers()
    rng = np.random.default_rng(0)
    for n in sizes:
        x = jax.device_put(rng.standard_normal((n, n), np.float32), device)
        w = jax.device_put(rng.standard_normal((n, n), np.float32), device)
        native = jax.jit(lambda a, b: jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST))
        xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
        native_bf16 = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
        t_native = median_time(lambda: native(x, w), reps)
        t_bf16 = median_time(lambda: native_bf16(xb, wb), reps)
        flops = 2.0 * n**3
        record(
            f"GEMM {n}^3 native f32 HIGHEST",
            "-",
            t_native,
            t_native,
            "f32 HIGHEST",
            f"{flops / t_native / 1e12:.1f} TFLOP/s",
        )
        record(
            f"GEMM {n}^3 native bf16",
            "-",
            t_bf16,
            t_native,
            "f32 HIGHEST",
            f"{flops / t_bf16 / 1e12:.1f} TFLOP/s",
        )
        for mbits in mbits_list:
            m = mb.mbm(mbits)
            approx = jax.jit(lambda a, b, m=m: approx_dot(a, b, m))
            t = median_time(lambda: approx(x, w), reps if mbits <= 7 else max(2, reps // 2))
            record(
                f"GEMM {n}^3",
                f"mbm{mbits}",
                t,
                t_native,
                "f32 HIGHEST",
                f"{flops / t / 1e12:.2f} TFLOP/s-equiv; vs bf16 {t / t_bf16:.1f}x",
            )
            # The same GEMM another way (an env knob read at each launch;
            # same bits): at M >= 8, every LUT entry read from global memory
            # instead of MBM's closed form; at M = 3, 7 the LUT kernel
            # instead of the expanded-operand kernel; at M = 3 also the
            # expanded kernel's opt-in two-blocks-per-SM build (128 registers
            # a thread instead of 216; M <= 5); at M = 7 the 256 x 64 tile with
            # 8-k chunks instead of 4; at M = 5, 7 all 2^M planes instead of
            # MBM's 2^(M-1) (its effective index width).
            variants = []
            if mbits >= 8 and n == 1024:
                variants.append(("APPROX_JAX_CUDA_FORMULA", "0", f"GEMM {n}^3 LUT reads"))
            if mbits in (3, 7) and n >= 4096:
                variants.append(("APPROX_JAX_CUDA_EXPANDED", "0", f"GEMM {n}^3 LUT kernel"))
            if mbits in (3, 5):
                variants.append(("APPROX_JAX_CUDA_EXPANDED_BLOCKS", "2", f"GEMM {n}^3 2 blocks/SM"))
            if mbits == 7:
                variants.append(("APPROX_JAX_CUDA_EXPANDED_M7_BK", "8", f"GEMM {n}^3 kBK 8"))
            if mbits in (5, 7) and n >= 4096:
                variants.append(("APPROX_JAX_CUDA_NARROW", "0", f"GEMM {n}^3 all 2^M planes"))
            for knob, value, case in variants:
                t_default, t = _paired_variant(lambda: approx(x, w), knob, value)
                record(
                    case,
                    f"mbm{mbits}",
                    t,
                    t_native,
                    "f32 HIGHEST",
                    f"{flops / t / 1e12:.2f} TFLOP/s-equiv",
                    base=f"GEMM {n}^3",
                    paired_default_s=t_default,
                )
            if mbits == 7 and n >= 4096:
                # A LUT with no structure (every index bit matters): the
                # expanded kernel's cost at the full width.
                m_rand = random_design(mbits)
                rand = jax.jit(lambda a, b: approx_dot(a, b, m_rand))
                t = median_time(lambda: rand(x, w), 3, budget_s=5.0)
                record(
                    f"GEMM {n}^3",
                    f"random{mbits}",
                    t,
                    t_native,
                    "f32 HIGHEST",
                    f"{flops / t / 1e12:.2f} TFLOP/s-equiv",
                )


@guarded("GEMM dW")
def bench_gemm_weight_grad(device, mbits_list, reps):
    """Weight-gradient-shaped GEMMs (tiny output, huge K): split-K on vs off."""
    approx_dot = _op("approx_dot")
    mb = _multipliers()
    rng = np.random.default_rng(2)
    # conv3x3 64->64 on 32x56x56 (dW = patches^T @ dy) and LeNet-5 conv1 (batch 256).
    for rows, k, n in [(576, 32 * 56 * 56, 64), (25, 256 * 28 * 28, 32)]:
        x = jax.device_put(rng.standard_normal((rows, k), np.float32), device)
        w = jax.device_put(rng.standard_normal((k, n), np.float32), device)
        native = jax.jit(lambda a, b: jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST))
        t_native = median_time(lambda: native(x, w), reps)
        case = f"GEMM dW {rows}x{k}x{n}"
        for mbits in [m for m in mbits_list if m <= 7] or [7]:
            m = mb.mbm(mbits)
            approx = jax.jit(lambda a, b, m=m: approx_dot(a, b, m))
            t = median_time(lambda: approx(x, w), reps)
            record(case, f"mbm{mbits}", t, t_native, "f32 HIGHEST", "split-K auto")
        if mbits_list:
            # Same op with split-K disabled (env read at each launch).
            m = mb.mbm(7)
            approx = jax.jit(lambda a, b, m=m: approx_dot(a, b, m))
            with _env("APPROX_JAX_CUDA_SPLIT_K", "1"):
                t = median_time(lambda: approx(x, w), 2, budget_s=5.0)
            record(case, "mbm7", t, t_native, "f32 HIGHEST", "split-K off")


@guarded("ResNet-18 GEMMs")
def bench_resnet_gemms(device, reps):
    """The im2col GEMMs of a ResNet-18 train step (batch 32, mbm7): where time goes."""
    approx_dot = _op("approx_dot")
    m = _multipliers().mbm(7)
    rng = np.random.default_rng(3)
    shapes = [
        ("conv1 fwd", 32 * 112 * 112, 147, 64),
        ("layer1 fwd/dX", 32 * 56 * 56, 576, 64),
        ("layer2 fwd/dX", 32 * 28 * 28, 1152, 128),
        ("layer2 dW", 1152, 32 * 28 * 28, 128),
        ("layer3 fwd/dX", 32 * 14 * 14, 2304, 256),
        ("layer3 dW", 2304, 32 * 14 * 14, 256),
        ("layer4 fwd/dX", 32 * 7 * 7, 4608, 512),
        ("layer4 dW", 4608, 32 * 7 * 7, 512),
    ]
    native = jax.jit(lambda a, b: jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST))
    approx = jax.jit(lambda a, b: approx_dot(a, b, m))
    for name, rows, k, n in shapes:
        x = jax.device_put(rng.standard_normal((rows, k), np.float32), device)
        w = jax.device_put(rng.standard_normal((k, n), np.float32), device)
        t_native = median_time(lambda: native(x, w), reps)
        t = median_time(lambda: approx(x, w), reps)
        record(
            f"R18 {name} {rows}x{k}x{n}",
            "mbm7",
            t,
            t_native,
            "f32 HIGHEST",
            f"{2.0 * rows * k * n / t / 1e12:.2f} TFLOP/s-equiv",
        )
        # Opt-in variants (env knobs read at each launch; same bits): the
        # 128 x 64 tile where it fills the SMs' waves better (layers 3-4 have
        # 56-144 default tiles on 132 SMs), and 8-k chunks at M = 7.
        for knob, value, label in (
            ("APPROX_JAX_CUDA_EXPANDED_FILL", "1", "fill tile"),
            ("APPROX_JAX_CUDA_EXPANDED_M7_BK", "8", "kBK 8"),
        ):
            t_default, t_var = _paired_variant(lambda: approx(x, w), knob, value)
            record(
                f"R18 {name} {label}",
                "mbm7",
                t_var,
                t_native,
                "f32 HIGHEST",
                f"{2.0 * rows * k * n / t_var / 1e12:.2f} TFLOP/s-equiv",
                base=f"R18 {name} {rows}x{k}x{n}",
                paired_default_s=t_default,
            )


@guarded("conv")
def bench_conv(device, batch, mbits_list, reps):
    approx_conv = _op("approx_conv")
    mb = _multipliers()
    rng = np.random.default_rng(1)
    x = jax.device_put(rng.standard_normal((batch, 56, 56, 64), np.float32), device)
    k = jax.device_put((rng.standard_normal((3, 3, 64, 64)) * 0.05).astype(np.float32), device)
    dn = ("NHWC", "HWIO", "NHWC")
    native = jax.jit(
        lambda a, b: jax.lax.conv_general_dilated(
            a, b, (1, 1), "SAME", dimension_numbers=dn, precision=jax.lax.Precision.HIGHEST
        )
    )
    t_native = median_time(lambda: native(x, k), reps)
    case = f"conv3x3 {batch}x56x56x64->64 SAME fwd"
    for mbits in mbits_list:
        m = mb.mbm(mbits)
        approx = jax.jit(
            lambda a, b, m=m: approx_conv(
                a, b, m, window_strides=(1, 1), padding="SAME", dimension_numbers=dn
            )
        )
        t = median_time(lambda: approx(x, k), reps)
        record(case, f"mbm{mbits}", t, t_native, "lax.conv f32")

    def native_loss(a, b):
        y = jax.lax.conv_general_dilated(
            a, b, (1, 1), "SAME", dimension_numbers=dn, precision=jax.lax.Precision.HIGHEST
        )
        return jnp.sum(y * y)

    native_g = jax.jit(jax.grad(native_loss, argnums=(0, 1)))
    t_native_g = median_time(lambda: native_g(x, k), reps)
    m = mb.mbm(7)

    def approx_loss(a, b):
        y = approx_conv(a, b, m, window_strides=(1, 1), padding="SAME", dimension_numbers=dn)
        return jnp.sum(y * y)

    approx_g = jax.jit(jax.grad(approx_loss, argnums=(0, 1)))
    t = median_time(lambda: approx_g(x, k), reps)
    record(f"conv3x3 {batch}x56x56x64->64 fwd+bwd", "mbm7", t, t_native_g, "lax.conv f32")


def _train_step_bench(name, model_name, batch, device, reps, mbits=7):
    import optax

    from approx_jax import models

    mb = _multipliers()
    model = models.create(model_name)
    input_shape = tuple(model.input_shape)
    rng = np.random.default_rng(2)
    x = jax.device_put(rng.random((batch, *input_shape), np.float32), device)
    y = jax.device_put(rng.integers(0, 10, batch), device)
    params = jax.device_put(model.init(jax.random.PRNGKey(0), x[:1]), device)
    opt = optax.sgd(1e-2, momentum=0.9)
    state = jax.device_put(opt.init(params), device)

    def make_step(mult):
        def loss_fn(p, xb, yb):
            out = model.apply(p, xb, mult)
            logits = out[0] if isinstance(out, tuple) else out
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        @jax.jit
        def step(p, s, xb, yb):  # batch passed in: no constant folding of it
            loss, g = jax.value_and_grad(loss_fn)(p, xb, yb)
            updates, s = opt.update(g, s, p)
            return optax.apply_updates(p, updates), s, loss

        return step

    # The native step twice: in true float32 (precision HIGHEST, like the
    # GEMM rows; the baseline) and at XLA's default precision, which on
    # Ampere/Hopper runs f32 convolutions and dots on TF32 tensor cores.
    native = make_step(mb.exact())
    native_tf32 = make_step(mb.exact())
    approx = make_step(mb.mbm(mbits))
    with jax.default_matmul_precision("highest"):
        t_native = median_time(lambda: native(params, state, x, y), reps)
    t_tf32 = median_time(lambda: native_tf32(params, state, x, y), reps)
    t = median_time(lambda: approx(params, state, x, y), reps)
    shape = "x".join(map(str, input_shape))
    record(
        f"{name} train step ({batch}x{shape})",
        f"mbm{mbits}",
        t,
        t_native,
        "f32 HIGHEST",
        f"vs default precision (TF32 on GPU) {t / t_tf32:.1f}x",
    )


@guarded("LeNet-5 train step")
def bench_lenet5(device, reps):
    _train_step_bench("LeNet-5", "lenet5", 256, device, reps)


@guarded("ResNet-18 train step")
def bench_resnet18(device, reps, batch):
    _train_step_bench("ResNet-18", "resnet18", batch, device, reps)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1024^3 only, fewer reps")
    parser.add_argument("--mbits", default="3,5,7,11")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--only", default="gemm,conv,lenet5,resnet18")
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="run on the CPU (a smoke test of this script before a GPU session; "
        "use with --quick --reps 1)",
    )
    args = parser.parse_args(argv)
    out_dir = os.environ.get("OUT") or "./bench_out"
    os.makedirs(out_dir, exist_ok=True)
    mbits_list = [int(v) for v in args.mbits.split(",")]
    only = set(args.only.split(","))
    try:
        device = jax.devices("cpu" if args.cpu else "gpu")[0]
    except RuntimeError:
        print("bench_gpu: JAX has no GPU backend; nothing to measure", file=sys.stderr)
        return 2
    import approx_jax  # noqa: F401 - registers the kernels

    try:
        from approx_jax._src.ffi import registered_platforms

        platforms = registered_platforms()
    except Exception:  # noqa: BLE001
        platforms = ("?",)
    print(f"device: {device.device_kind}; jax {jax.__version__}; approx_jax kernels: {platforms}")
    path = os.path.join(out_dir, "bench_gpu.json")
    JSON_OUT.update(
        path=path,
        meta=dict(device=device.device_kind, jax=jax.__version__, platforms=list(platforms)),
    )
    print(f"{'case':44s} {'mult':8s} {'approx':>12s}  {'baseline':14s} {'native':>12s}  ratio")
    if "gemm" in only:
        bench_gemm(device, [1024] if args.quick else [1024, 4096], mbits_list, args.reps)
        bench_gemm_weight_grad(device, mbits_list, args.reps)
        bench_resnet_gemms(device, args.reps)
    if "conv" in only:
        bench_conv(
            device, 8 if args.quick else 32, [m for m in mbits_list if m <= 7] or [7], args.reps
        )
    if "lenet5" in only:
        bench_lenet5(device, args.reps)
    if "resnet18" in only:
        bench_resnet18(device, args.reps, 8 if args.quick else 32)
    elapsed = time.perf_counter() - T_START
    write_json()
    print(f"\nwrote {path} ({elapsed:.0f} s)")
    print_variant_summary()
    # (The MBM rows: a random design's row shares the case.)
    targets = [
        r
        for r in ROWS
        if r["case"] == "GEMM 4096^3" and "ratio" in r and r["multiplier"].startswith("mbm")
    ]
    for r in targets:
        mbits = int(r["multiplier"][3:])
        limit = 3.0 if mbits <= 5 else 6.0 if mbits <= 7 else None
        verdict = "n/a" if limit is None else ("MET" if r["ratio"] <= limit else "MISSED")
        print(
            f"target GEMM 4096^3 {r['multiplier']}: {r['ratio']:.2f}x native f32 "
            f"(target <= {limit}x): {verdict}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
