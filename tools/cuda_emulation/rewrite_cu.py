"""Rewrites a CUDA source of xla_kernels/ into C++ for the CPU emulation.

Three constructs of the .cu files are not C++; everything else compiles
against the stand-in headers of this folder (cuda_runtime.h):

* ``Kernel<<<grid, block, smem, stream>>>(args);`` becomes a synchronous
  ``::cuda_emu::RunBlocks(&Kernel, grid, block, smem, [&] { Kernel(args); })``;
* ``extern __shared__ ... T name[];`` becomes a pointer to the launch's
  dynamic shared memory;
* the one inline PTX instruction, ``mul.rn.ftz.f32``, becomes
  ``cuda_emu::MulRnFtz``.

Anything else CUDA-only (another ``asm``, static ``__shared__`` arrays, warp
intrinsics) makes the rewrite fail loudly rather than compile to something
that is not what the GPU runs; device functions the stand-in header lacks
(atomics other than ``atomicOr``, for one) fail to compile.

Usage: python rewrite_cu.py SRC.cu OUT.cc
"""

from __future__ import annotations

import re
import sys

_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\((.*?)\)\s*;", re.S)
_EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([A-Za-z_][\w ]*?)\s+(\w+)\s*\[\s*\]\s*;"
)
_MUL_FTZ = re.compile(
    r'asm\(\s*"mul\.rn\.ftz\.f32 %0, %1, %2;"\s*'
    r':\s*"=f"\((\w+)\)\s*:\s*"f"\((\w+)\),\s*"f"\((\w+)\)\s*\)\s*;'
)


def _split_top_level(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur).strip())
    return parts


def _launch(m: re.Match) -> str:
    kernel, config, args = m.group(1), m.group(2), " ".join(m.group(3).split())
    cfg = _split_top_level(config)
    if not 2 <= len(cfg) <= 4:
        raise SystemExit(f"rewrite_cu: launch configuration of {kernel}: {config!r}")
    grid, block = cfg[0], cfg[1]
    smem = cfg[2] if len(cfg) > 2 else "0"
    # The same number of lines as the launch, so #line keeps later lines right.
    lines = "\n" * m.group(0).count("\n")
    return (
        f'::cuda_emu::RunBlocks(::cuda_emu::KernelKey(&{kernel}), "{kernel}", dim3({grid}), '
        f"dim3({block}), static_cast<size_t>({smem}), [&]() {{ {kernel}({args}); }});{lines}"
    )


def rewrite(src: str) -> str:
    out, launches = _LAUNCH.subn(_launch, src)
    out = _EXTERN_SHARED.sub(
        lambda m: (
            f"{m.group(1)}* const {m.group(2)} = "
            f"reinterpret_cast<{m.group(1)}*>(::cuda_emu::DynamicSmem());"
        ),
        out,
    )
    out = _MUL_FTZ.sub(
        lambda m: f"{m.group(1)} = ::cuda_emu::MulRnFtz({m.group(2)}, {m.group(3)});", out
    )
    leftovers = [
        tok
        for tok in ("<<<", "asm(", "asm (", "__shared__", "__shfl", "__syncwarp")
        if tok in re.sub(r"//[^\n]*", "", out)
    ]
    if leftovers:
        raise SystemExit(f"rewrite_cu: cannot emulate {leftovers} (extend rewrite_cu.py)")
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        src = f.read()
    with open(argv[2], "w") as f:
        f.write(f'#line 1 "{argv[1]}"\n')
        f.write(rewrite(src))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
