"""The CUDA kernels of xla_kernels/, run on the CPU by tools/cuda_emulation.

Without a GPU this is what holds the CUDA launchers (every kernel, split-K
mode, LUT placement and device size) to the bits of the reference the CPU
kernels are held to; on a GPU machine tests/test_gpu.py compares the real
thing. The emulation itself is checked here too: its source rewrite, and that
it fails on a kernel with a missing barrier or a wrong product.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "cuda_emulation"

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None, reason="needs a C++ compiler"
)


def _rewriter():
    spec = importlib.util.spec_from_file_location("rewrite_cu", TOOL / "rewrite_cu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(
    build: Path, kernels: Path = ROOT / "xla_kernels", mode: str = "quick", cxxflags: str = ""
):
    """Builds and runs the emulation harness on the kernels in ``kernels``."""
    env = dict(os.environ, CUDA_EMULATION_BUILD=str(build), PYTHON=sys.executable)
    if cxxflags:
        env["CUDA_EMULATION_CXXFLAGS"] = cxxflags
    if kernels != ROOT / "xla_kernels":
        # A modified copy (a broken kernel): its first failure is enough, and
        # it runs the same tool on other sources.
        env["CUDA_EMULATION_STOP_AT_FAILURE"] = "1"
        tree = build / "tree"
        shutil.copytree(ROOT / "tools", tree / "tools")
        shutil.copytree(kernels, tree / "xla_kernels")
        script = tree / "tools" / "cuda_emulation" / "run.sh"
    else:
        script = TOOL / "run.sh"
    return subprocess.run(
        ["bash", str(script), mode], capture_output=True, text=True, env=env, timeout=900
    )


@pytest.mark.slow
def test_cuda_launchers_give_the_reference_bits_under_emulation(tmp_path):
    res = _run(tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = res.stdout.strip().splitlines()[-1]
    assert summary.endswith(" 0 failures"), summary
    # Every kind of launch ran: the numbers are not vacuous.
    runs = int(summary.split()[0])
    assert runs > 300, summary


@pytest.mark.slow
@pytest.mark.parametrize(
    "file,old,new",
    [
        # The fma must take the flushed scale product (SPEC step 6's underflow).
        (
            "cuda_kernels.cu",
            "__fmaf_rn(MulFtz(fa[i], fb[j]), l, acc[i][j])",
            "__fmaf_rn(fa[i] * fb[j], l, acc[i][j])",
        ),
        # The barrier between expanding a stage and computing on it.
        (
            "cuda_gemm_expanded.cu",
            "          __syncthreads();\n          slow_cur = slow_next;",
            "          slow_cur = slow_next;",
        ),
    ],
    ids=["unflushed-underflow", "missing-barrier"],
)
def test_emulation_catches_a_broken_kernel(tmp_path, file, old, new):
    kernels = tmp_path / "xla_kernels"
    shutil.copytree(ROOT / "xla_kernels", kernels)
    src = (kernels / file).read_text()
    assert old in src, "the kernel changed: update this test's mutation"
    (kernels / file).write_text(src.replace(old, new, 1))
    res = _run(tmp_path / "build", kernels, mode="smoke")
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    assert "FAIL" in res.stdout


@pytest.mark.slow
def test_ucontext_thread_switch_gives_the_reference_bits_too(tmp_path):
    # x86-64 builds switch a block's threads with their own few instructions;
    # sanitizer builds and other CPUs use ucontext, kept working here.
    res = _run(tmp_path, mode="smoke", cxxflags="-O2 -DCUDA_EMULATION_UCONTEXT")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = res.stdout.strip().splitlines()[-1]
    assert summary.endswith(" 0 failures") and int(summary.split()[0]) > 100, summary


def test_rewrite_turns_launches_and_shared_memory_into_cpp():
    rw = _rewriter()
    out = rw.rewrite(
        "__global__ void K(int a) { extern __shared__ __align__(16) unsigned char smem[]; }\n"
        "void Go(int x, cudaStream_t s) {\n"
        "  K<<<dim3(f(1, 2), 3), 256, 64,\n      s>>>(x);\n"
        "  T<int, 2><<<g, b>>>(x,\n y);\n}\n"
    )
    assert "<<<" not in out and "__shared__" not in out
    assert (
        '::cuda_emu::RunBlocks(::cuda_emu::KernelKey(&K), "K", dim3(dim3(f(1, 2), 3)), '
        "dim3(256), static_cast<size_t>(64), [&]() { K(x); });" in out
    )
    assert "[&]() { T<int, 2>(x, y); });" in out and "static_cast<size_t>(0)" in out
    assert "unsigned char* const smem = reinterpret_cast<unsigned char*>" in out
    # Launches keep their line count, so #line keeps later lines right.
    assert out.count("\n") == 7


@pytest.mark.parametrize(
    "construct",
    [
        'asm("add.f32 %0, %1, %2;" : "=f"(r) : "f"(x), "f"(y));',
        "__shared__ float tile[64];",
        "v = __shfl_sync(0xffffffff, v, 1);",
    ],
)
def test_rewrite_refuses_what_it_cannot_emulate(construct):
    with pytest.raises(SystemExit, match="cannot emulate"):
        _rewriter().rewrite(f"__global__ void K(float* p) {{ {construct} }}\n")
