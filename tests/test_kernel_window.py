"""The in-kernel window edge (``moa_window.window_edge``) against the contract's ``window_at``, bit for bit.

Under TRITON_INTERPRET=1 on the CPU (numpy rounds every op) and compiled on a GPU when there is one. The
inputs aim at the places where arithmetic shortcuts change the answer: ``alpha + beta * n`` exactly on an
integer or one ulp either side (a fused multiply-add moves floor by one there), betas like 0.1 and 1/3 that
are not exact in binary, the min_span clamp, the S(n) = n cap and n <= sink.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from conftest import interpret_triton_without_gpu

from moa_hub.remote import remote_module

os.environ.setdefault("HF_TOKEN", "")
INTERPRET = interpret_triton_without_gpu()
triton = pytest.importorskip("triton")
tl = triton.language

window = remote_module("moa_window")
spans = remote_module("moa_spans")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_interpreter = pytest.mark.skipif(
    INTERPRET and not window.INTERPRETED,
    reason="triton was imported before TRITON_INTERPRET=1 was set: set it at the top of tests/conftest.py",
)
window_edge = window.window_edge


@triton.jit
def _edges(Pos, Alpha, Beta, Out, count, SINK: tl.constexpr, MIN_SPAN: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < count
    pos = tl.load(Pos + offs, mask=ok, other=0)
    alpha = tl.load(Alpha + offs, mask=ok, other=0.0)
    beta = tl.load(Beta + offs, mask=ok, other=0.0)
    tl.store(Out + offs, window_edge(pos, alpha, beta, SINK, MIN_SPAN), mask=ok)


def kernel_edges(pos, alpha, beta, sink: int, min_span: int) -> torch.Tensor:
    pos, alpha, beta = (t.to(DEVICE).contiguous() for t in (pos, alpha, beta))
    out = torch.empty_like(pos)
    _edges[(triton.cdiv(pos.numel(), 1024),)](pos, alpha, beta, out, pos.numel(), sink, min_span, BLOCK=1024)
    return out.cpu()


def contract_edges(pos, alpha, beta, sink: int, min_span: int) -> torch.Tensor:
    """lo = n - W(n) from window_at (torch, float64) per element; 2**40 for padding."""
    n = pos.clamp(min=0) + 1
    return torch.where(pos >= 0, n - spans.window_at(n, alpha, beta, sink, min_span), window.BIG)


def edge_cases(seed: int, sink: int, min_span: int):
    """(pos, alpha, beta) float64 cases: random rules, floor edges +-1 ulp, clamps, n <= sink, padding."""
    gen = torch.Generator().manual_seed(seed)
    betas = torch.tensor([0.0, 0.1, 0.3, 1 / 3, 0.7, 0.5, 1.0, 0.55, 2 / 3, 0.9999], dtype=torch.float64)
    count = 6000
    n = torch.randint(1, 300_001, (count,), generator=gen)
    n[:400] = torch.arange(1, 401)  # small n: below and around sink and min_span
    n[400:600] = min_span + torch.arange(-100, 100).clamp(min=-min_span + 1)
    beta = torch.where(
        torch.rand(count, generator=gen, dtype=torch.float64) < 0.7,
        betas[torch.randint(0, len(betas), (count,), generator=gen)],
        torch.rand(count, generator=gen, dtype=torch.float64),
    )
    alpha = (torch.rand(count, generator=gen, dtype=torch.float64) - 0.2) * 3000  # non-integer, some negative
    # floor edges: alpha so that alpha + beta * n lands on an integer, then nudge alpha by -1, 0, +1 ulp
    edge = slice(1000, 5000)
    # near floor(beta * n) (no cancellation) or small (alpha cancels most of beta * n: there an FMA's single
    # rounding keeps the product's error and lands one ulp below the integer)
    small = torch.rand(4000, generator=gen) < 0.5
    near = torch.floor(beta[edge] * n[edge]) + torch.randint(-200, 200, (4000,), generator=gen).double()
    target = torch.where(small, torch.randint(0, 3000, (4000,), generator=gen).double(), near)
    base = target - beta[edge] * n[edge]
    nudge = torch.randint(-1, 2, (4000,), generator=gen)
    alpha[edge] = torch.where(nudge < 0, torch.nextafter(base, base - 1), base)
    alpha[edge] = torch.where(nudge > 0, torch.nextafter(base, base + 1), alpha[edge])
    alpha[5000:5300] = 0.0  # products of inexact betas near integers: 0.1 * 30 = 3.0000000000000004
    pos = n - 1
    pos[5300:5400] = -1  # padding queries
    return pos, alpha, beta


@needs_interpreter
@pytest.mark.parametrize("sink,min_span", [(0, 1), (4, 10), (64, 128), (5, 5)])
def test_window_edge_equals_window_at(sink, min_span):
    pos, alpha, beta = edge_cases(sink * 1000 + min_span, sink, min_span)
    got = kernel_edges(pos, alpha, beta, sink, min_span)
    want = contract_edges(pos, alpha, beta, sink, min_span)
    bad = (got != want).nonzero().flatten()[:5].tolist()
    assert not bad, [(int(pos[i]), float(alpha[i]), float(beta[i]), int(got[i]), int(want[i])) for i in bad]
    assert torch.equal(window.window_lo(pos[None], alpha[:1], beta[:1], sink, min_span)[0, 0, :400],
                       contract_edges(pos[:400], alpha[:1].expand(400), beta[:1].expand(400), sink, min_span))  # fmt: skip


def test_edge_cases_hit_floor_edges_where_a_fused_multiply_add_differs():
    """The cases have power: for some of them floor(fma(beta, n, alpha)) != floor(alpha + beta * n)."""
    pos, alpha, beta = edge_cases(64128, 64, 128)
    differ = 0
    for i in range(1000, 5400):
        n = int(pos[i]) + 1
        a, b = float(alpha[i]), float(beta[i])
        fused = float(Fraction(a) + Fraction(b) * n)  # one rounding of the exact value, as an FMA does
        differ += math.floor(fused) != math.floor(a + b * n)
    assert differ >= 20, f"only {differ} cases sit on a floor edge: the test would not catch FMA contraction"


COMPILE_CHECK = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moa_hub.remote import remote_module
window_edge = remote_module("moa_window").window_edge

@triton.jit
def edges(Pos, Alpha, Beta, Out, SINK: tl.constexpr, MIN_SPAN: tl.constexpr):
    offs = tl.arange(0, 128)
    tl.store(Out + offs, window_edge(tl.load(Pos + offs), tl.load(Alpha + offs), tl.load(Beta + offs), SINK, MIN_SPAN))

sig = {"Pos": "*i64", "Alpha": "*fp64", "Beta": "*fp64", "Out": "*i64", "SINK": "constexpr", "MIN_SPAN": "constexpr"}
src = ASTSource(fn=edges, signature=sig, constexprs={(4,): 64, (5,): 128})
ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
print("FMA64", ptx.count("fma.rn.f64"), "MUL64", ptx.count("mul.rn.f64"), "ADD64", ptx.count("add.rn.f64"))
"""


def test_compiled_window_edge_rounds_product_and_sum_separately(tmp_path):
    """Compiled for Hopper (no GPU needed), the edge uses explicitly rounded mul/add and no float64 FMA."""
    script = tmp_path / "compile_edge.py"  # triton.jit needs its source in a file
    script.write_text(COMPILE_CHECK)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    if run.returncode != 0 and ("ptxas" in run.stderr or "CUDA" in run.stderr or "nvidia" in run.stderr.lower()):
        pytest.skip(f"this triton cannot compile for CUDA here: {run.stderr.strip().splitlines()[-1]}")
    assert run.returncode == 0, run.stderr[-2000:]
    counts = dict(zip(run.stdout.split()[::2], map(int, run.stdout.split()[1::2]), strict=True))
    assert counts["FMA64"] == 0 and counts["MUL64"] >= 1 and counts["ADD64"] >= 1, counts
