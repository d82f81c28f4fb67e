"""Online MTP training: the policy's gradients and update are bitwise those without it, and the MTP
heads get gradient from the MTP loss only."""

from __future__ import annotations

import copy

import torch
from specrl_helpers import checkpoint_with_mtp, make_args, plugin_manager, tiny_model

from miles_core import Sample, Status
from miles_core.loop import make_train_batch
from miles_core.model import load_model
from miles_core.train.trainer import Trainer


def _samples(n: int = 4, seed: int = 0) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(1, 48, (3 + i,), generator=g).tolist()
        resp = torch.randint(1, 48, (5 + 2 * i,), generator=g).tolist()
        s = Sample(group_index=i // 2, index=i, tokens=prompt + resp, response_length=len(resp))
        s.loss_mask = [1] * len(resp)
        s.loss_mask[0] = 0
        s.rollout_log_probs = [-1.0] * len(resp)
        s.status, s.reward = Status.COMPLETED, float(i % 2)
        out.append(s)
    return out


def _train_once(ckpt, train_mtp: bool, *extra: str):
    pm = plugin_manager()
    flags = ["--hf-checkpoint", str(ckpt), "--mtp-num-layers", "2", *extra]
    args = make_args(pm, *flags, *(["--enable-mtp-training"] if train_mtp else []), "--clip-grad", "0.5")
    model = load_model(ckpt)
    pm.hook.configure_model(args=args, model=model, role="train")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(args, pm, model)
    metrics = trainer.train(0, make_train_batch(_samples(), args))[-1]
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return model, before, grads, metrics


def test_policy_update_is_bitwise_unchanged_and_mtp_trains(tmp_path):
    ckpt = checkpoint_with_mtp(tmp_path, tiny_model(), num_layers=2)
    m0, before0, g0, met0 = _train_once(ckpt, train_mtp=False)
    m1, before1, g1, met1 = _train_once(ckpt, train_mtp=True)
    policy = [n for n, _ in m0.named_parameters() if not n.startswith("mtp.")]
    assert all(torch.equal(g0[n], g1[n]) for n in policy)
    assert all(
        torch.equal(p0, p1) for (n, p0), p1 in zip(m0.named_parameters(), m1.parameters()) if n in policy
    )
    assert met0["grad_norm"] == met1["grad_norm"]  # the MTP gradient stays out of the policy's clipping
    assert not any(n.startswith("mtp.") for n in g0)
    assert all(torch.equal(before0[n], p) for n, p in m0.named_parameters() if n.startswith("mtp."))
    changed = [not torch.equal(before1[n], p) for n, p in m1.named_parameters() if n.startswith("mtp.")]
    assert all(changed)
    assert met1["mtp_loss"] > 0 and 0 <= met1["mtp_acc_1"] <= 1 and "mtp_acc_2" in met1
    assert met1["mtp_grad_norm"] > 0


def test_chained_depth_one_training_leaves_the_policy_alone_and_trains_depth_one_only(tmp_path):
    """--mtp-train-chain 3: depth 1 is trained as the drafter uses it (three tokens, fed its own state);
    the policy's update is still bitwise unchanged and depth 2 gets no gradient."""
    ckpt = checkpoint_with_mtp(tmp_path, tiny_model(), num_layers=2)
    m0, _, g0, met0 = _train_once(ckpt, False)
    m1, before1, g1, met1 = _train_once(ckpt, True, "--mtp-train-chain", "3")
    policy = [n for n, _ in m0.named_parameters() if not n.startswith("mtp.")]
    assert all(torch.equal(g0[n], g1[n]) for n in policy) and met0["grad_norm"] == met1["grad_norm"]
    assert {"mtp_acc_1", "mtp_acc_2", "mtp_acc_3"} <= set(met1) and "mtp_acc_4" not in met1
    moved = {
        n.split(".")[2]
        for n, p in m1.named_parameters()
        if n.startswith("mtp.") and not torch.equal(before1[n], p)
    }
    assert moved == {"0"}


def test_chain_of_one_is_the_plain_depth_one_loss():
    from miles_specrl.mtp import attach_mtp
    from miles_specrl.training import mtp_losses

    model = tiny_model(seed=4, vocab=16).requires_grad_(False)
    heads = attach_mtp(model, 2)
    ids = torch.randint(0, 16, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 9)
    hidden = model(ids[:, :-1], return_hidden=True).hidden
    plain = mtp_losses(model, heads, hidden, ids, mask)
    one = mtp_losses(model, heads, hidden, ids, mask, chain=[heads.layers[0]])
    three = mtp_losses(model, heads, hidden, ids, mask, chain=[heads.layers[0]] * 3)
    assert len(one) == 1 and len(three) == 3 and torch.equal(one[0][0], plain[0][0])
    assert torch.equal(three[0][0], plain[0][0]) and not torch.equal(three[1][0], plain[1][0])


def test_mtp_gradient_comes_from_the_mtp_loss_alone(tmp_path):
    ckpt = checkpoint_with_mtp(tmp_path, tiny_model(seed=1), num_layers=1)
    pm = plugin_manager()
    args = make_args(pm, "--hf-checkpoint", str(ckpt), "--mtp-num-layers", "1", "--enable-mtp-training")
    model = load_model(ckpt)
    pm.hook.configure_model(args=args, model=model, role="train")
    trainer = Trainer(args, pm, model)
    batch = make_train_batch(_samples(), args)
    batch.old_log_probs = trainer.compute_log_probs(batch, "old")
    batch.advantages = [torch.ones(s.response_length) for s in batch.samples]
    mtp_trainer = pm.get_plugin("specrl.run").mtp_trainer
    pm.hook.pre_forward(args=args, model=model, batch=batch, stage="train")
    mb = next(trainer.micro_batches(batch, [0, 1]))
    trainer._micro_step(batch, mb, denom=2.0)  # policy loss + MTP loss
    full = {p: g.clone() for p, g in mtp_trainer.parked.items()}
    mtp_trainer.parked = {}
    model.zero_grad(set_to_none=True)
    out = model(mb.input_ids, return_hidden=True)
    loss, _ = mtp_trainer.loss(model, mb, out)
    loss.backward()  # the MTP loss alone
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("mtp."))
    alone = mtp_trainer.parked
    assert set(alone) == set(full) and len(full) == len(list(model.mtp.parameters()))
    for p, g in full.items():
        torch.testing.assert_close(alone[p], g, rtol=1e-6, atol=1e-8)
    mtp_trainer.remove()


def test_mtp_loss_learns_a_copy_task():
    """Sanity of the loss wiring: on sequences where token i+2 == token i, depth 1 becomes accurate."""
    from miles_specrl.mtp import attach_mtp
    from miles_specrl.training import mtp_losses

    model = tiny_model(seed=3, vocab=16).requires_grad_(False)
    heads = attach_mtp(model, 1)
    opt = torch.optim.Adam(heads.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        pair = torch.randint(0, 16, (32, 2), generator=g)
        ids = pair.repeat(1, 6)
        mask = torch.ones_like(ids, dtype=torch.float32)
        hidden = model(ids[:, :-1], return_hidden=True).hidden
        ((ce, correct, n),) = mtp_losses(model, heads, hidden, ids, mask)
        opt.zero_grad()
        (ce / n).backward()
        opt.step()
    assert correct / n > 0.9
    _ = copy  # keep the import list honest for ruff
