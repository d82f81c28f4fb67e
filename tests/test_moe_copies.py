"""The MoE permutation's autograd (gathers both ways) gives plain indexing's values and gradients."""

from __future__ import annotations

import torch

from miles_core.model.moe import combine_copies, dispatch_copies, expert_order


def test_dispatch_and_combine_match_plain_indexing():
    g = torch.Generator().manual_seed(0)
    n, k, h, e = 9, 3, 5, 4
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])
    flat = idx.reshape(-1)
    order, dest = expert_order(flat, e)
    x = torch.randn(n, h, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.rand(n, k, dtype=torch.float64, generator=g, requires_grad=True)
    scale = torch.randn(n * k, h, dtype=torch.float64, generator=g)  # a stand-in for the experts

    def ours(x, w):
        return combine_copies(dispatch_copies(x, order, dest) * scale, order, dest, w, x.dtype)

    def plain(x, w):
        ys = x[order // k] * scale
        unsorted = torch.zeros_like(ys).index_put((order,), ys)
        return (unsorted.view(n, k, h) * w[..., None]).sum(1)

    torch.testing.assert_close(ours(x, w), plain(x, w))
    assert torch.autograd.gradcheck(ours, (x, w))
    go = torch.randn(n, h, dtype=torch.float64, generator=g)
    a = torch.autograd.grad(ours(x, w), (x, w), go)
    b = torch.autograd.grad(plain(x, w), (x, w), go)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v)
    with torch.no_grad():  # the no-grad path (rollout) gives the same values
        torch.testing.assert_close(ours(x, w), plain(x, w))
