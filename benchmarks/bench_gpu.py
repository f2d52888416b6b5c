"""GPU speed of approximate GEMM, conv and train steps vs native XLA ops.

Median wall time of each approximate op and of its native counterpart on the
first GPU, and their ratio (approx / native = slowdown). Every ratio comes
from one alternated measurement: the approximate op, the native op (and, where
a row compares them, the bf16 GEMM, the TF32 train step or an opt-in
variant's default) run in turns in the same rounds, every other round in
reverse order (``_timing.alternating_samples``, as bench_cpu.py), after
untimed warm-up calls (compilation) of each, with ``block_until_ready``.
Writes ``$OUT/bench_gpu.json`` (``OUT`` defaults to ``./bench_out``; each row
also holds its per-round samples) after every row. Every section is guarded:
a missing piece of the package prints ``n/a`` instead of stopping the
script. Sized to finish in well under 4 minutes on an H200.

Usage:
  python benchmarks/bench_gpu.py [--quick] [--mbits 3,5,7,11] [--reps 5]
  python benchmarks/bench_gpu.py --cpu --quick --reps 1   # smoke test on the CPU
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
from _timing import alternating_samples  # noqa: E402

ROWS: list[dict] = []
T_START = time.perf_counter()
# The JSON file and the run's description, rewritten after every row (main):
# a run cut short by its time limit still leaves what it measured.
JSON_OUT: dict = {}


# Untimed calls of each candidate before the timed rounds (main: 2 on a GPU,
# 1 in the --cpu smoke test).
WARMUP = [2]
# Opt-in variants: timed rounds (their verdict needs several samples).
VARIANT_REPS = 5


def timed(fns: dict, reps: int, budget_s: float = 20.0) -> dict:
    """Per-round seconds of each candidate, measured alternately in the same
    rounds (reps reduced if one round is slow)."""
    return alternating_samples(fns, reps=reps, warmup=WARMUP[0], budget_s=budget_s)


def med(samples: dict) -> dict:
    """name -> median seconds."""
    return {name: statistics.median(v) for name, v in samples.items()}


def variant_verdict(default_s: list, variant_s: list) -> str:
    """Whether an opt-in variant beats its default, allowing for noise.

    Rule: "faster" only when the medians differ by more than 3% AND the
    difference exceeds the spread of the alternated samples, i.e. every
    variant sample is below every default sample of the same rounds (the
    two ranges do not overlap); "slower" the other way round; otherwise
    "same" (within the noise, or under 3%). Two sets of 5 samples of one
    distribution fail to overlap in a given direction with probability
    2/252 < 1%, so a spurious verdict among the ~20 variants is unlikely
    (the ratio of medians of 5 beyond +-3% alone called 17 of 20 variants
    "faster" or "slower" in a --cpu run, where the CUDA knobs do nothing).
    Fewer than 3 samples each: no verdict.
    """
    if min(len(default_s), len(variant_s)) < 3:
        return "too few samples"
    speedup = statistics.median(default_s) / statistics.median(variant_s)
    if speedup > 1.03 and max(variant_s) < min(default_s):
        return "faster"
    if speedup < 0.97 and min(variant_s) > max(default_s):
        return "slower"
    return "same"


def record(
    case: str,
    multiplier: str,
    approx_s,
    native_s,
    baseline: str,
    note: str = "",
    base: str | None = None,
    paired_default_s: float | None = None,
    samples: dict | None = None,
):
    """One result row; `base`: the case this row is an opt-in variant of, and
    `paired_default_s` the default's time measured alternately with it;
    `samples`: the per-round seconds of each candidate of the alternated
    measurement the medians come from."""
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
    if samples is not None:
        row["samples_s"] = samples
        if base is not None and "default" in samples and "variant" in samples:
            row["verdict"] = variant_verdict(samples["default"], samples["variant"])
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
    """Each opt-in variant's time against its default, to decide defaults:
    the medians of the default and the variant timed alternately (same
    noise), the verdict (``variant_verdict``'s rule) and each one's range."""
    lines = []
    for r in ROWS:
        s = r.get("samples_s") or {}
        if "verdict" not in r or not r.get("paired_default_s") or not r["approx_s"]:
            continue
        speedup = r["paired_default_s"] / r["approx_s"]
        spread = ", ".join(
            f"{name} {min(s[name]) * 1e3:.3f}-{max(s[name]) * 1e3:.3f} ms"
            for name in ("default", "variant")
        )
        lines.append(
            f"  {r['case']:40s} {r['multiplier']:8s} {speedup:5.2f}x ({r['verdict']})  {spread}"
        )
    if lines:
        print(
            "opt-in variants, default time / variant time (faster/slower: > 3% and "
            "the sample ranges do not overlap; else same):"
        )
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


def _with_env(run, knob: str, value: str):
    """``run`` with an env knob set during each call (read at each launch)."""

    def call():
        with _env(knob, value):
            return run()

    return call


def _paired_variant(run, knob: str, value: str, native) -> dict:
    """Per-round seconds of ``run()`` without ("default") and with
    ("variant") an env knob and of ``native()``, measured alternately.

    (Variants timed apart from their default, a median of 3 after it,
    followed the GPU's own drift: one native layer took 0.46 and 0.75 ms in
    two runs.)
    """
    fns = {"default": run, "variant": _with_env(run, knob, value), "native": native}
    return timed(fns, VARIANT_REPS)


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
        call_native = lambda: native(x, w)
        call_bf16 = lambda: native_bf16(xb, wb)
        samples = timed({"native": call_native, "bf16": call_bf16}, reps)
        t = med(samples)
        flops = 2.0 * n**3
        record(
            f"GEMM {n}^3 native f32 HIGHEST",
            "-",
            t["native"],
            t["native"],
            "f32 HIGHEST",
            f"{flops / t['native'] / 1e12:.1f} TFLOP/s",
            samples=samples,
        )
        record(
            f"GEMM {n}^3 native bf16",
            "-",
            t["bf16"],
            t["native"],
            "f32 HIGHEST",
            f"{flops / t['bf16'] / 1e12:.1f} TFLOP/s",
            samples=samples,
        )
        for mbits in mbits_list:
            m = mb.mbm(mbits)
            approx = jax.jit(lambda a, b, m=m: approx_dot(a, b, m))
            samples = timed(
                {"approx": lambda: approx(x, w), "native": call_native, "bf16": call_bf16},
                reps if mbits <= 7 else max(2, reps // 2),
            )
            t = med(samples)
            record(
                f"GEMM {n}^3",
                f"mbm{mbits}",
                t["approx"],
                t["native"],
                "f32 HIGHEST",
                f"{flops / t['approx'] / 1e12:.2f} TFLOP/s-equiv; "
                f"vs bf16 {t['approx'] / t['bf16']:.1f}x",
                samples=samples,
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
                samples = _paired_variant(lambda: approx(x, w), knob, value, call_native)
                t = med(samples)
                record(
                    case,
                    f"mbm{mbits}",
                    t["variant"],
                    t["native"],
                    "f32 HIGHEST",
                    f"{flops / t['variant'] / 1e12:.2f} TFLOP/s-equiv",
                    base=f"GEMM {n}^3",
                    paired_default_s=t["default"],
                    samples=samples,
                )
            if mbits == 7 and n >= 4096:
                # A LUT with no structure (every index bit matters): the
                # expanded kernel's cost at the full width.
                m_rand = random_design(mbits)
                rand = jax.jit(lambda a, b: approx_dot(a, b, m_rand))
                samples = timed(
                    {"approx": lambda: rand(x, w), "native": call_native}, 3, budget_s=5.0
                )
                t = med(samples)
                record(
                    f"GEMM {n}^3",
                    f"random{mbits}",
                    t["approx"],
                    t["native"],
                    "f32 HIGHEST",
                    f"{flops / t['approx'] / 1e12:.2f} TFLOP/s-equiv",
                    samples=samples,
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
        call_native = lambda: native(x, w)
        case = f"GEMM dW {rows}x{k}x{n}"
        for mbits in [m for m in mbits_list if m <= 7] or [7]:
            m = mb.mbm(mbits)
            approx = jax.jit(lambda a, b, m=m: approx_dot(a, b, m))
            samples = timed({"approx": lambda: approx(x, w), "native": call_native}, reps)
            t = med(samples)
            record(
                case,
                f"mbm{mbits}",
                t["approx"],
                t["native"],
                "f32 HIGHEST",
                "split-K auto",
                samples=samples,
            )
        if mbits_list:
            # Same op with split-K disabled (env read at each launch).
            m = mb.mbm(7)
            approx = jax.jit(lambda a, b, m=m: approx_dot(a, b, m))
            split_k_off = _with_env(lambda: approx(x, w), "APPROX_JAX_CUDA_SPLIT_K", "1")
            samples = timed({"approx": split_k_off, "native": call_native}, 2, budget_s=5.0)
            t = med(samples)
            record(
                case,
                "mbm7",
                t["approx"],
                t["native"],
                "f32 HIGHEST",
                "split-K off",
                samples=samples,
            )


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
        call_approx = lambda: approx(x, w)
        call_native = lambda: native(x, w)
        samples = timed({"approx": call_approx, "native": call_native}, reps)
        t = med(samples)
        record(
            f"R18 {name} {rows}x{k}x{n}",
            "mbm7",
            t["approx"],
            t["native"],
            "f32 HIGHEST",
            f"{2.0 * rows * k * n / t['approx'] / 1e12:.2f} TFLOP/s-equiv",
            samples=samples,
        )
        # Opt-in variants (env knobs read at each launch; same bits): the
        # 128 x 64 tile where it fills the SMs' waves better (layers 3-4 have
        # 56-144 default tiles on 132 SMs), and 8-k chunks at M = 7.
        for knob, value, label in (
            ("APPROX_JAX_CUDA_EXPANDED_FILL", "1", "fill tile"),
            ("APPROX_JAX_CUDA_EXPANDED_M7_BK", "8", "kBK 8"),
        ):
            samples = _paired_variant(call_approx, knob, value, call_native)
            t = med(samples)
            record(
                f"R18 {name} {label}",
                "mbm7",
                t["variant"],
                t["native"],
                "f32 HIGHEST",
                f"{2.0 * rows * k * n / t['variant'] / 1e12:.2f} TFLOP/s-equiv",
                base=f"R18 {name} {rows}x{k}x{n}",
                paired_default_s=t["default"],
                samples=samples,
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
    call_native = lambda: native(x, k)
    case = f"conv3x3 {batch}x56x56x64->64 SAME fwd"
    for mbits in mbits_list:
        m = mb.mbm(mbits)
        approx = jax.jit(
            lambda a, b, m=m: approx_conv(
                a, b, m, window_strides=(1, 1), padding="SAME", dimension_numbers=dn
            )
        )
        samples = timed({"approx": lambda: approx(x, k), "native": call_native}, reps)
        t = med(samples)
        record(case, f"mbm{mbits}", t["approx"], t["native"], "lax.conv f32", samples=samples)

    def native_loss(a, b):
        y = jax.lax.conv_general_dilated(
            a, b, (1, 1), "SAME", dimension_numbers=dn, precision=jax.lax.Precision.HIGHEST
        )
        return jnp.sum(y * y)

    native_g = jax.jit(jax.grad(native_loss, argnums=(0, 1)))
    m = mb.mbm(7)

    def approx_loss(a, b):
        y = approx_conv(a, b, m, window_strides=(1, 1), padding="SAME", dimension_numbers=dn)
        return jnp.sum(y * y)

    approx_g = jax.jit(jax.grad(approx_loss, argnums=(0, 1)))
    samples = timed({"approx": lambda: approx_g(x, k), "native": lambda: native_g(x, k)}, reps)
    t = med(samples)
    record(
        f"conv3x3 {batch}x56x56x64->64 fwd+bwd",
        "mbm7",
        t["approx"],
        t["native"],
        "lax.conv f32",
        samples=samples,
    )


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

    def call_native():
        # (Entered at every call: the precision is part of jit's cache key,
        # so a call outside it would run the step at the default precision.)
        with jax.default_matmul_precision("highest"):
            return native(params, state, x, y)

    samples = timed(
        {
            "approx": lambda: approx(params, state, x, y),
            "native": call_native,
            "tf32": lambda: native_tf32(params, state, x, y),
        },
        reps,
    )
    t = med(samples)
    shape = "x".join(map(str, input_shape))
    record(
        f"{name} train step ({batch}x{shape})",
        f"mbm{mbits}",
        t["approx"],
        t["native"],
        "f32 HIGHEST",
        f"vs default precision (TF32 on GPU) {t['approx'] / t['tf32']:.1f}x",
        samples=samples,
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
    parser.add_argument(
        "--mbits", default="3,5,7,11", help="comma list of widths M (default 3,5,7,11)"
    )
    parser.add_argument("--reps", type=int, default=5, help="timed alternated rounds per case")
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed calls of each candidate before its timed rounds (default 2; 1 with --cpu)",
    )
    parser.add_argument(
        "--only",
        default="gemm,conv,lenet5,resnet18",
        help="comma list of gemm, conv, lenet5, resnet18 (default: all)",
    )
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
    WARMUP[0] = args.warmup if args.warmup is not None else 1 if args.cpu else 2
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
