"""--bf16 training: bf16 weights with fp32 masters, fp32 gradient accumulation and exact resume."""

from __future__ import annotations

import pytest
import torch
from test_trainer import make_args, rollout

from miles_core.loop import make_train_batch
from miles_core.model import load_model
from miles_core.plugins import get_plugin_manager
from miles_core.train.optim import MasterAdamW
from miles_core.train.trainer import Trainer

PM = get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""})
ADAM = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in [(7, 5), (5,), (3, 4, 2)]]


@pytest.mark.parametrize("clip", [float("inf"), 0.5])
def test_masters_follow_torch_adamw(clip):
    ref, ours = _params(0), _params(0)
    opt_ref = torch.optim.AdamW(ref, **ADAM)
    opt = MasterAdamW(ours, dtype=torch.bfloat16, **ADAM)
    assert all(p.dtype == torch.bfloat16 for p in ours)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        opt_ref.zero_grad()
        opt.zero_grad()
        for micro in range(2):  # two micro-batches: their gradients add up in fp32
            grads = [torch.randn(p.shape, generator=g) for p in ref]
            for p, q, x in zip(ref, ours, grads):
                p.grad = x.clone() if p.grad is None else p.grad + x
                q.grad += x.to(torch.bfloat16)  # as backward does: in place into the flat buffer
            opt.accumulate(last=micro == 1)
        norm_ref = torch.nn.utils.clip_grad_norm_(ref, clip)
        norm = opt.clip_grad_norm_(clip)
        opt_ref.step()
        opt.step()
        masters = [opt.state[q]["master"] for q in ours]
        # bf16 rounding of the gradients only: the masters stay within a small fraction of the lr.
        assert float(norm) == pytest.approx(float(norm_ref), rel=2e-2)
        for p, q, m in zip(ref, ours, masters):
            assert m.dtype == torch.float32
            assert torch.equal(q.data, m.to(torch.bfloat16))
            torch.testing.assert_close(m, p.data, atol=2e-3, rtol=0)


def test_exact_when_gradients_are_bf16_values():
    """Gradients that bf16 holds exactly give the same fp32 masters as torch's AdamW, bit for bit
    up to the fused kernel's arithmetic."""
    ref, ours = _params(2), _params(2)
    opt_ref, opt = torch.optim.AdamW(ref, fused=True, **ADAM), MasterAdamW(ours, **ADAM)
    for step in range(3):
        grads = [torch.full(p.shape, 0.25 * (step + 1)) for p in ref]
        opt.zero_grad()
        for p, q, x in zip(ref, ours, grads):
            p.grad, q.grad = x.clone(), x.to(torch.bfloat16)  # a replaced .grad is folded in too
        opt.accumulate(last=True)
        opt_ref.step()
        opt.step()
    for p, q in zip(ref, ours):
        torch.testing.assert_close(opt.state[q]["master"], p.data, atol=1e-6, rtol=1e-6)


def test_hooked_parameter_is_not_clipped():
    """A parameter with a post-accumulate-grad hook (how miles-specrl parks its MTP gradients until the
    step) stays out of the flat buffers: its gradient is applied as given; the clipped ones are scaled."""
    a, b = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))
    b.register_post_accumulate_grad_hook(lambda p: None)
    opt = MasterAdamW([a, b], lr=1.0, betas=(0.0, 0.0), eps=0.0, weight_decay=0.0)
    opt.zero_grad()
    a.grad += 10.0
    opt.accumulate(last=True)
    norm = opt.clip_grad_norm_(1.0)
    assert float(norm) == pytest.approx(20.0)
    b.grad = torch.full((4,), 3.0, dtype=torch.bfloat16)
    opt.step()
    # betas 0: the update is lr * g / |g| = sign per element whatever the scale; check the moments.
    assert torch.allclose(opt.state[a]["exp_avg"], torch.full((4,), 10.0 / 20.0), rtol=1e-5)
    assert torch.allclose(opt.state[b]["exp_avg"], torch.full((4,), 3.0))
    assert b.grad is None and b.dtype == torch.bfloat16
    assert float(a.detach()[0]) == -1.0 and float(b.detach()[0]) == -1.0


def test_bf16_trainer_weights_and_accumulation(tiny_ckpt):
    """--bf16: the policy holds bf16 weights (the masters are the loaded fp32 ones), and the fp32
    gradient of a step does not depend on how it is split into micro-batches."""
    grads = []
    for mbs in ("1", "8"):
        args = make_args(tiny_ckpt, ["--micro-batch-size", mbs, "--bf16"])
        batch = make_train_batch(rollout(tiny_ckpt, args), args)
        fp32 = load_model(tiny_ckpt)
        model = load_model(tiny_ckpt)
        trainer = Trainer(args, PM, model)
        opt = trainer.optimizer
        assert isinstance(opt, MasterAdamW)
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        for (_, p), q in zip(fp32.named_parameters(), model.parameters()):
            assert torch.equal(opt.state[q]["master"], p.data)
        opt.step = lambda: None  # keep weights fixed; inspect the accumulated gradient
        metrics = trainer.train(0, batch)[0]
        assert metrics["grad_norm"] > 0
        grads.append(torch.cat([g.flatten() for g in opt.main_grads()]))
    # bf16 forward/backward differ with the micro-batch shapes only by rounding.
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert float(cos) > 0.99
    assert torch.allclose(grads[0].norm(), grads[1].norm(), rtol=0.05)


def test_bf16_trainer_learns_and_resumes_exactly(tiny_ckpt):
    args = make_args(tiny_ckpt, ["--micro-batch-size", "4", "--bf16"])
    batch = make_train_batch(rollout(tiny_ckpt, args), args)
    trainer = Trainer(args, PM, load_model(tiny_ckpt))
    trainer.train(0, batch)
    before = [x.sum() for x in batch.old_log_probs]
    after = [x.sum() for x in trainer.compute_log_probs(batch, "old")]
    up = [a - b for a, b, s in zip(after, before, batch.samples) if s.reward > 0]
    down = [a - b for a, b, s in zip(after, before, batch.samples) if s.reward == 0]
    assert sum(up) / len(up) > sum(down) / len(down)

    # Resume as the loop does: the checkpoint's weights (bf16 values) are loaded, then the optimizer
    # state puts back the exact fp32 masters.
    state = trainer.state_dict()
    model = load_model(tiny_ckpt)
    with torch.no_grad():
        for p, q in zip(model.parameters(), trainer.model.parameters()):
            p.copy_(q.float())
    resumed = Trainer(args, PM, model)
    resumed.load_state_dict(state)
    for p, q in zip(trainer.model.parameters(), resumed.model.parameters()):
        a, b = trainer.optimizer.state[p], resumed.optimizer.state[q]
        assert b["master"].dtype == torch.float32
        for k in ("master", "exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a[k], b[k]), k
        assert torch.equal(p.data, q.data)
    batch2 = make_train_batch(rollout(tiny_ckpt, args, seed=1), args)
    m1, m2 = trainer.train(1, batch2)[0], resumed.train(1, batch2)[0]
    assert m1["pg_loss"] == m2["pg_loss"] and m1["grad_norm"] == m2["grad_norm"]
    for p, q in zip(trainer.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p.data, q.data)


def test_fp32_optimizer_state_loads_into_bf16_run(tiny_ckpt):
    """A checkpoint written without --bf16 (torch AdamW) resumes under --bf16: moments and steps come
    back, the masters are the loaded weights."""
    args32 = make_args(tiny_ckpt, ["--micro-batch-size", "8"])
    batch = make_train_batch(rollout(tiny_ckpt, args32), args32)
    t32 = Trainer(args32, PM, load_model(tiny_ckpt))
    t32.train(0, batch)
    model = load_model(tiny_ckpt)
    with torch.no_grad():
        for p, q in zip(model.parameters(), t32.model.parameters()):
            p.copy_(q)
    t16 = Trainer(make_args(tiny_ckpt, ["--micro-batch-size", "8", "--bf16"]), PM, model)
    t16.load_state_dict(t32.state_dict())
    for p, q in zip(t32.model.parameters(), t16.model.parameters()):
        s32, s16 = t32.optimizer.state[p], t16.optimizer.state[q]
        assert torch.equal(s16["exp_avg"], s32["exp_avg"]) and float(s16["step"]) == float(s32["step"])
        assert torch.equal(t16.optimizer.state[q]["master"], p.data)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_update_matches_eager():
    """On CUDA the flat AdamW update runs compiled; it must give the eager update's numbers."""
    from miles_core.train.optim import _update_fn, adamw_update

    n = 1 << 20
    outs = []
    for fn in (adamw_update, _update_fn(torch.device("cuda"))):
        g = torch.Generator().manual_seed(0)
        master, m, grad = (torch.randn(n, generator=g).cuda() for _ in range(3))
        m, v = m * 1e-3, torch.rand(n, generator=g).cuda() * 1e-6
        grad, w = grad.to(torch.bfloat16), torch.empty(n, device="cuda", dtype=torch.bfloat16)
        hyper = torch.tensor([1e-3, 0.9, 0.95, 1e-8, 0.1, 1 - 0.9**3, (1 - 0.95**3) ** 0.5], device="cuda")
        fn(master, m, v, grad, w, hyper, torch.tensor(2.0, device="cuda"))
        outs.append((master, m, v, w))
    for a, b in zip(outs[0][:3], outs[1][:3]):  # fp32 state: the same up to fused arithmetic
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for master, _, _, w in outs:  # the weights are the masters rounded, in both
        assert torch.equal(w, master.to(torch.bfloat16))
