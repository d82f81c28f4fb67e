"""The MoE permutation's autograd (gathers both ways) gives plain indexing's values and gradients."""

from __future__ import annotations

import pytest
import torch

from miles_core.model.moe import combine_copies, dispatch_copies, expert_order, sum_copies


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


def test_sum_copies_and_weight_dispatch_match_plain_indexing():
    """The grouped path's form: weights dispatched to the sorted copies (k = 1) and applied before the
    (linear) down projection, then an unweighted sum of each token's copies = combine_copies."""
    g = torch.Generator().manual_seed(1)
    n, k, h, e = 11, 2, 4, 5
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])
    order, dest = expert_order(idx.reshape(-1), e)
    ys = torch.randn(n * k, h, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.rand(n, k, dtype=torch.float64, generator=g, requires_grad=True)

    def ours(ys, w):
        ws = dispatch_copies(w.reshape(-1, 1), order, dest).reshape(-1)
        return sum_copies(ys * ws[:, None], order, dest, k)

    def plain(ys, w):
        return combine_copies(ys, order, dest, w, ys.dtype)

    torch.testing.assert_close(ours(ys, w), plain(ys, w))
    assert torch.autograd.gradcheck(ours, (ys, w))
    go = torch.randn(n, h, dtype=torch.float64, generator=g)
    for u, v in zip(
        torch.autograd.grad(ours(ys, w), (ys, w), go), torch.autograd.grad(plain(ys, w), (ys, w), go)
    ):
        torch.testing.assert_close(u, v)
    with torch.no_grad():
        torch.testing.assert_close(ours(ys, w), plain(ys, w))


def test_sorted_ends_match_counted_ends():
    from miles_core.model.moe import Experts, expert_bounds

    g = torch.Generator().manual_seed(1)
    experts = Experts(8, 4, 4)
    for flat in (torch.randint(0, 8, (300,), generator=g), torch.tensor([0, 0, 7, 7]), torch.tensor([3])):
        order, _ = expert_order(flat, 8)
        bounds = expert_bounds(flat, 8)
        assert bounds[0] == 0 and bounds.dtype == torch.int32
        assert torch.equal(bounds[1:], experts._sorted_ends(flat[order]))
    # hand-counted: experts 0 and 7 own two copies each, 1..6 none
    assert expert_bounds(torch.tensor([7, 0, 7, 0]), 8).tolist() == [0, 2, 2, 2, 2, 2, 2, 2, 4]


def _check_compiled_topk(device: str) -> None:
    from miles_core.model.moe import _topk

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    compiled = torch.compile(_topk, dynamic=False)
    for rows in (64, 4096):
        # Few distinct values: ties everywhere, as bf16 router probabilities have.
        probs = (torch.randint(0, 6, (rows, 32), generator=g).float() / 8).to(device)
        want_v, want_i = _topk(probs, 4)
        got_v, got_i = compiled(probs, 4)
        assert torch.equal(got_i, want_i) and torch.equal(got_v, want_v)


def test_compiled_topk_of_many_rows_ranks_ties_like_the_stable_sort():
    """Under torch.compile, many rows (training) take k argmax rounds, few rows (decode) the ranking;
    both must give the eager stable sort's experts, ties to the lower expert."""
    _check_compiled_topk("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_topk_ties_on_cuda():
    _check_compiled_topk("cuda")
