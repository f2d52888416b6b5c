"""Peak memory of approx_conv (forward + backward) vs the native convolution.

Uses XLA's compiled memory analysis: peak ~= arguments + outputs + temporaries
(minus aliased bytes) of ``jit(value_and_grad(loss))`` where the loss is the
sum of squares of one convolution layer. Default: a ResNet-style layer, batch
32, 32x32x64 -> 64 channels, 3x3, SAME.

Usage:
  python benchmarks/bench_conv_memory.py [--batch 32] [--size 32] [--cin 64]
      [--cout 64] [--kernel 3] [--multiplier mbm7] [--time]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from jax import lax

from approx_jax._src import conv as conv_lib
from approx_jax._src import multipliers as mult_lib


def _peak_bytes(compiled) -> dict:
    ma = compiled.memory_analysis()
    if ma is None:
        return {}
    args = ma.argument_size_in_bytes
    out = ma.output_size_in_bytes
    temp = ma.temp_size_in_bytes
    alias = getattr(ma, "alias_size_in_bytes", 0)
    return {
        "arguments": args,
        "outputs": out,
        "temporaries": temp,
        "peak": args + out + temp - alias,
    }


def _loss_native(x, w):
    y = lax.conv_general_dilated(
        x,
        w,
        (1, 1),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=lax.Precision.HIGHEST,
    )
    return jnp.sum(y * y)


def _make_loss_approx(m):
    def loss(x, w):
        y = conv_lib.approx_conv(x, w, m, padding="SAME")
        return jnp.sum(y * y)

    return loss


def measure(loss, x, w, run: bool):
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    compiled = fn.lower(x, w).compile()
    info = _peak_bytes(compiled)
    if run:
        jax.block_until_ready(compiled(x, w))
        t = time.perf_counter()
        jax.block_until_ready(compiled(x, w))
        info["seconds"] = time.perf_counter() - t
    return info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="(default 32)")
    parser.add_argument("--size", type=int, default=32, help="input height = width (default 32)")
    parser.add_argument("--cin", type=int, default=64, help="input channels (default 64)")
    parser.add_argument("--cout", type=int, default=64, help="output channels (default 64)")
    parser.add_argument("--kernel", type=int, default=3, help="window size (default 3)")
    parser.add_argument("--multiplier", default="mbm7", help="(default mbm7)")
    parser.add_argument("--time", action="store_true", help="also run once and time it")
    parser.add_argument(
        "--limits", default="64,16,4", help="extra chunk limits to compare, MiB, comma-separated"
    )
    args = parser.parse_args(argv)

    x = jnp.ones((args.batch, args.size, args.size, args.cin), jnp.float32)
    w = jnp.ones((args.kernel, args.kernel, args.cin, args.cout), jnp.float32) * 0.01
    m = mult_lib.get(args.multiplier)
    print(f"layer: x {x.shape}, w {w.shape}, SAME, fwd+bwd; backend {jax.default_backend()}")

    rows = [("native lax conv", measure(_loss_native, x, w, args.time))]
    default = conv_lib.PATCH_CHUNK_BYTES
    limit_now = conv_lib.chunk_limit_bytes()
    patch_bytes = 4 * args.batch * args.size * args.size * args.kernel**2 * args.cin
    print(f"patch matrix: {patch_bytes / 2**20:.1f} MiB; chunk limit {limit_now / 2**20:.0f} MiB")
    rows.append(
        (
            f"approx_conv (default, {limit_now >> 20} MiB)",
            measure(_make_loss_approx(m), x, w, args.time),
        )
    )
    try:
        conv_lib.PATCH_CHUNK_BYTES = 1 << 62
        rows.append(("approx_conv (no chunking)", measure(_make_loss_approx(m), x, w, args.time)))
        for limit in (int(v) for v in args.limits.split(",") if v.strip()):
            conv_lib.PATCH_CHUNK_BYTES = limit << 20
            rows.append(
                (
                    f"approx_conv (chunk limit {limit} MiB)",
                    measure(_make_loss_approx(m), x, w, args.time),
                )
            )
    finally:
        conv_lib.PATCH_CHUNK_BYTES = default

    base = rows[0][1].get("peak")
    for name, info in rows:
        if not info:
            print(f"{name:36s} memory analysis unavailable on this backend")
            continue
        ratio = info["peak"] / base if base else float("nan")
        extra = f"  {info['seconds'] * 1e3:8.1f} ms" if "seconds" in info else ""
        print(
            f"{name:36s} peak {info['peak'] / 2**20:8.1f} MiB "
            f"(args {info['arguments'] / 2**20:.1f}, temp {info['temporaries'] / 2**20:.1f})  "
            f"ratio {ratio:5.2f}x{extra}"
        )


if __name__ == "__main__":
    main()
