"""grouped_mm_fast and grouped_mm_padded against the per-expert loop, forward and backward."""

from __future__ import annotations

import pytest
import torch

from evomoe.ops.grouped_mm import grouped_mm_fast, grouped_mm_loop, grouped_mm_padded, grouped_mm_supported

FAST_IMPLS = {"fast": grouped_mm_fast, "padded": grouped_mm_padded}

# (counts per expert, K, N): empty experts, all rows on one expert, zero rows, odd totals
CASES = [
    ([3, 0, 5], 8, 12),
    ([0, 0, 0], 8, 4),
    ([13, 0, 0, 0], 4, 8),
    ([0, 0, 0, 7], 12, 8),
    ([1], 8, 8),
    ([0, 11], 4, 4),
    ([2, 5, 1, 0, 6, 3, 0, 7], 16, 12),
    ([17, 1, 1, 2, 0], 8, 16),
]


def _random_case(counts: list[int], K: int, N: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    counts_E = torch.tensor(counts, dtype=torch.long)
    P = int(counts_E.sum())
    x = (torch.randn(P, K, generator=g) * 0.5).to(dtype).requires_grad_(True)
    w = (torch.randn(len(counts), K, N, generator=g) * 0.5).to(dtype).requires_grad_(True)
    g_out = torch.randn(P, N, generator=g).to(dtype)
    return x, w, counts_E, g_out


def _run(fn, x, w, counts_E, g_out):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    y = fn(x, w, counts_E)
    (y * g_out).sum().backward()
    gx = x.grad if x.grad is not None else torch.zeros_like(x)
    gw = w.grad if w.grad is not None else torch.zeros_like(w)
    return y.detach(), gx, gw


@pytest.mark.parametrize("impl", sorted(FAST_IMPLS))
@pytest.mark.parametrize("counts,K,N", CASES)
def test_matches_loop_fp32(impl, counts, K, N):
    x, w, counts_E, g_out = _random_case(counts, K, N)
    y_ref, gx_ref, gw_ref = _run(grouped_mm_loop, x, w, counts_E, g_out)
    y, gx, gw = _run(FAST_IMPLS[impl], x, w, counts_E, g_out)
    assert y.shape == (int(counts_E.sum()), N)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(gw, gw_ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", sorted(FAST_IMPLS))
@pytest.mark.parametrize("seed", range(6))
def test_matches_loop_random_counts(impl, seed):
    g = torch.Generator().manual_seed(100 + seed)
    E = int(torch.randint(1, 9, (1,), generator=g))
    counts = torch.randint(0, 12, (E,), generator=g)
    counts[torch.rand(E, generator=g) < 0.3] = 0  # some empty experts
    K, N = 4 * int(torch.randint(1, 5, (1,), generator=g)), 4 * int(torch.randint(1, 5, (1,), generator=g))
    x, w, counts_E, g_out = _random_case(counts.tolist(), K, N, seed=seed)
    y_ref, gx_ref, gw_ref = _run(grouped_mm_loop, x, w, counts_E, g_out)
    y, gx, gw = _run(FAST_IMPLS[impl], x, w, counts_E, g_out)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(gw, gw_ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", sorted(FAST_IMPLS))
@pytest.mark.parametrize(
    "counts,K,N", [([3, 0, 5], 8, 16), ([9, 0, 0], 16, 8), ([0, 0, 0], 8, 8), ([2, 5, 1, 6], 8, 8)]
)
def test_matches_loop_bf16(impl, counts, K, N):
    x, w, counts_E, g_out = _random_case(counts, K, N, dtype=torch.bfloat16)
    y_ref, gx_ref, gw_ref = _run(grouped_mm_loop, x.float(), w.float(), counts_E, g_out.float())
    y, gx, gw = _run(FAST_IMPLS[impl], x, w, counts_E, g_out)
    assert y.dtype == gx.dtype == gw.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref, atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(gx.float(), gx_ref, atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(gw.float(), gw_ref, atol=5e-2, rtol=2e-2)


@pytest.mark.parametrize("impl", sorted(FAST_IMPLS))
def test_expanded_incoming_gradient(impl):
    """``y.sum().backward()`` hands the kernel an expanded (stride-0) gradient."""
    x, w, counts_E, _ = _random_case([4, 0, 3, 5], 8, 12)
    xr, wr = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    grouped_mm_loop(xr, wr, counts_E).sum().backward()
    FAST_IMPLS[impl](x, w, counts_E).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(w.grad, wr.grad, atol=1e-5, rtol=0)


def test_fast_accepts_non_contiguous_input():
    x, w, counts_E, g_out = _random_case([3, 5], 8, 8)
    x_t = x.detach().t().contiguous().t().requires_grad_(True)  # same values, column-major
    assert not x_t.is_contiguous()
    y_ref, gx_ref, gw_ref = _run(grouped_mm_loop, x, w, counts_E, g_out)
    y = grouped_mm_fast(x_t, w, counts_E)
    (y * g_out).sum().backward()
    torch.testing.assert_close(y.detach(), y_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(x_t.grad, gx_ref, atol=1e-5, rtol=0)


def test_zero_rows_keep_graph_connected():
    for fn in (grouped_mm_loop, grouped_mm_fast, grouped_mm_padded):
        x = torch.zeros(0, 8, requires_grad=True)
        w = torch.randn(3, 8, 4, requires_grad=True)
        y = fn(x, w, torch.zeros(3, dtype=torch.long))
        assert y.shape == (0, 4)
        y.sum().backward()
        assert w.grad is not None and torch.count_nonzero(w.grad) == 0


@pytest.mark.parametrize(
    "dtype,K,N,expected",
    [
        (torch.float32, 4, 8, True),
        (torch.float32, 12, 4, True),
        (torch.float32, 6, 8, False),  # fp32 needs multiples of 4 (16 bytes)
        (torch.float32, 8, 6, False),
        (torch.float32, 2, 2, False),
        (torch.bfloat16, 8, 16, True),
        (torch.bfloat16, 4, 8, False),  # bf16 needs multiples of 8
        (torch.bfloat16, 8, 12, False),
        (torch.float16, 8, 8, False),  # not supported on CPU
        (torch.float64, 8, 8, False),
    ],
)
def test_supported_rules_cpu(dtype, K, N, expected):
    x = torch.zeros(5, K, dtype=dtype)
    w = torch.zeros(3, K, N, dtype=dtype)
    assert grouped_mm_supported(x, w) is expected


def test_supported_needs_equal_dtypes():
    assert not grouped_mm_supported(torch.zeros(5, 8), torch.zeros(2, 8, 8, dtype=torch.bfloat16))


@pytest.mark.parametrize("counts,K,N", [([3, 0, 5], 8, 12), ([0, 0, 7], 4, 4)])
def test_supported_shapes_run(counts, K, N):
    """Whatever ``grouped_mm_supported`` accepts, ``grouped_mm_fast`` computes."""
    x, w, counts_E, _ = _random_case(counts, K, N)
    assert grouped_mm_supported(x, w)
    assert grouped_mm_fast(x, w, counts_E).shape == (sum(counts), N)
