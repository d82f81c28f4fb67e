"""PPO with a critic: GAE, per-token rewards and the clipped value loss against hand-computed values,
the critic in the trainer (critic-only rollouts, learning), its flags, and save / resume of its state."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import base_argv, error_of, run_example
from test_trainer import make_args, rollout

from miles_core.cli import main
from miles_core.loop import make_train_batch
from miles_core.model import load_model
from miles_core.plugins import get_plugin_manager
from miles_core.testing import one_torch_thread  # noqa: F401  (an autouse fixture)
from miles_core.train.checkpoint import latest_checkpoint
from miles_core.train.ppo import PPO, gae, ppo_token_rewards, value_loss
from miles_core.train.trainer import Trainer
from miles_core.types import TrainBatch, UsageError


def close(got, want):
    assert torch.allclose(torch.as_tensor(got, dtype=torch.float32), torch.tensor(want), atol=1e-6), got


def test_gae_by_hand():
    # rewards [0, 0, 1], values [0.5, 0.2, 0.8], gamma 0.9, lambda 0.8 (V after the end is 0):
    # d2 = 1 - 0.8 = 0.2; d1 = 0.9*0.8 - 0.2 = 0.52; d0 = 0.9*0.2 - 0.5 = -0.32
    # A2 = 0.2; A1 = 0.52 + 0.72*0.2 = 0.664; A0 = -0.32 + 0.72*0.664 = 0.15808; R = A + V
    # A one-token sample beside it (reward 2, value 0.5): A = 1.5, R = 2; padding must not leak into it.
    r = [torch.tensor([0.0, 0.0, 1.0]), torch.tensor([2.0])]
    v = [torch.tensor([0.5, 0.2, 0.8]), torch.tensor([0.5])]
    adv, ret = gae(r, v, gamma=0.9, lambd=0.8)
    close(adv[0], [0.15808, 0.664, 0.2])
    close(ret[0], [0.65808, 0.864, 1.0])
    close(adv[1], [1.5])
    close(ret[1], [2.0])
    # gamma = lambda = 1: Monte Carlo return minus the value; returns are the reward-to-go
    adv, ret = gae(r[:1], v[:1], gamma=1.0, lambd=1.0)
    close(adv[0], [0.5, 0.8, 0.2])
    close(ret[0], [1.0, 1.0, 1.0])
    # lambda = 0: one-step TD errors
    adv, _ = gae(r[:1], v[:1], gamma=0.9, lambd=0.0)
    close(adv[0], [-0.32, 0.52, 0.2])


def test_ppo_token_rewards_by_hand():
    # -kl_coef * kl on trainable tokens, reward at the last trainable one (index 1 here), none on a
    # fully masked sample
    kl = [torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.4])]
    masks = [torch.tensor([1.0, 1.0, 0.0]), torch.tensor([0.0])]
    out = ppo_token_rewards(torch.tensor([1.0, 3.0]), kl, masks, kl_coef=0.5)
    close(out[0], [-0.05, 0.9, 0.0])
    close(out[1], [0.0])


def test_value_loss_by_hand():
    # clip 0.2, old values 0.5:
    # V=1.0, R=2: clipped V 0.7 -> (0.7-2)^2 = 1.69 vs (1-2)^2 = 1 -> 1.69, clipped
    # V=0.0, R=1: clipped V 0.3 -> 0.49 vs 1.0 -> 1.0, clipped
    # V=0.6, R=0: inside the clip -> 0.36 both, not clipped
    # V=0.9, R=1.5: clipped V 0.7 -> 0.64 vs 0.36 -> 0.64, clipped (the bound is |V - V_old| > clip)
    values = torch.tensor([1.0, 0.0, 0.6, 0.9])
    old = torch.full((4,), 0.5)
    returns = torch.tensor([2.0, 1.0, 0.0, 1.5])
    loss, clipped = value_loss(values, old, returns, 0.2)
    close(loss, [1.69, 1.0, 0.36, 0.64])
    close(clipped, [1.0, 1.0, 0.0, 1.0])


def _batch(args, samples, values):
    batch = make_train_batch(samples, args)
    batch.values = values
    return batch


def test_ppo_estimator_uses_values_and_normalize_flag(tiny_ckpt):
    args = make_args(tiny_ckpt, ["--advantage-estimator", "ppo", "--gamma", "0.9", "--lambd", "0.8"])
    batch = TrainBatch(
        samples=[], rewards=torch.tensor([1.0]), tokens=[], loss_masks=[torch.ones(3)],
    )  # fmt: skip
    batch.values = [torch.tensor([0.5, 0.2, 0.8])]
    close(PPO().advantages(args, batch)[0], [0.15808, 0.664, 0.2])
    args.normalize_advantages = True
    # whitened over the three tokens: mean 0.34069, unbiased std
    a = torch.tensor([0.15808, 0.664, 0.2])
    close(PPO().advantages(args, batch)[0], ((a - a.mean()) / a.std()).tolist())
    batch.values = None
    with pytest.raises(RuntimeError, match="critic"):
        PPO().advantages(args, batch)


def _trainer(tiny_ckpt, extra):
    args = make_args(tiny_ckpt, ["--advantage-estimator", "ppo", "--micro-batch-size", "4", *extra])
    pm = get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""})
    return args, Trainer(args, pm, load_model(tiny_ckpt))


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in params])


def test_critic_only_rollouts_leave_the_policy_and_train_the_critic(tiny_ckpt):
    args, trainer = _trainer(tiny_ckpt, ["--num-critic-only-steps", "1", "--critic-lr", "1e-2"])
    assert trainer.critic is not None and trainer.critic.lr == 1e-2
    samples = rollout(tiny_ckpt, args)
    policy0, critic0 = _flat(trainer.model.parameters()), _flat(trainer.critic.parameters())
    batch = make_train_batch(samples, args)
    metrics = trainer.train(0, batch)[-1]
    # the fresh head predicts 0 everywhere, so the values the advantages saw were all 0
    assert all(float(v.abs().max()) == 0.0 for v in batch.values)
    assert "pg_loss" not in metrics and metrics["value_loss"] > 0
    assert torch.equal(_flat(trainer.model.parameters()), policy0)
    assert not torch.equal(_flat(trainer.critic.parameters()), critic0)
    # the next rollout trains both
    metrics = trainer.train(1, make_train_batch(samples, args))[-1]
    assert "pg_loss" in metrics and not torch.equal(_flat(trainer.model.parameters()), policy0)


def test_critic_values_feed_gae_and_the_critic_regresses_on_returns(tiny_ckpt):
    """With the head's bias at 0.5 every value is 0.5; with gamma = lambda = 1 the returns are the
    sample's reward on every token and the advantages reward - 0.5 (not whitened)."""
    args, trainer = _trainer(tiny_ckpt, ["--gamma", "1.0", "--lambd", "1.0"])
    with torch.no_grad():
        trainer.critic.head.bias.fill_(0.5)
    batch = make_train_batch(rollout(tiny_ckpt, args), args)
    batch.old_log_probs = trainer.compute_log_probs(batch, "old")
    trainer.critic.prepare(batch)
    advantages = PPO().advantages(args, batch)
    for v, ret, adv, reward in zip(batch.values, trainer.critic._returns, advantages, batch.rewards):
        close(v, [0.5] * v.numel())
        close(ret, [float(reward)] * v.numel())
        close(adv, [float(reward) - 0.5] * v.numel())


def test_critic_learns_the_returns(tiny_ckpt):
    """Repeated steps on one rollout bring the critic's values toward its returns (value loss falls)."""
    args, trainer = _trainer(tiny_ckpt, ["--num-critic-only-steps", "100", "--critic-lr", "3e-3"])
    samples = rollout(tiny_ckpt, args)
    losses = [trainer.train(i, make_train_batch(samples, args))[-1]["value_loss"] for i in range(8)]
    assert losses[-1] < 0.5 * losses[0], losses


def test_critic_flags_are_checked(tiny_ckpt, tmp_path):
    with pytest.raises(UsageError, match="--critic-lr acts on the critic"):
        make_args(tiny_ckpt, ["--critic-lr", "1e-3"])
    with pytest.raises(UsageError, match="--num-critic-only-steps acts on the critic"):
        make_args(tiny_ckpt, ["--num-critic-only-steps", "2"])
    with pytest.raises(UsageError, match="--lambd must be in"):
        make_args(tiny_ckpt, ["--advantage-estimator", "ppo", "--lambd", "1.5"])
    with pytest.raises(UsageError, match="--value-clip must be positive"):
        make_args(tiny_ckpt, ["--advantage-estimator", "ppo", "--value-clip", "0"])
    assert _trainer(tiny_ckpt, [])[1].critic.lr == 1e-3  # --lr's
    with pytest.raises(UsageError, match="neither an HF checkpoint"):
        _trainer(tiny_ckpt, ["--critic-load", str(tmp_path)])


def test_critic_load_from_an_hf_checkpoint(tiny_ckpt, tiny_ckpt_b):
    _, trainer = _trainer(tiny_ckpt, ["--critic-load", str(tiny_ckpt_b)])
    other = load_model(tiny_ckpt_b)
    assert torch.equal(_flat(trainer.critic.model.parameters()), _flat(other.parameters()))


def test_critic_is_saved_and_resumed(tiny_ckpt, prompts_file, reward_file, tmp_path):
    """The run's checkpoint holds the critic (weights, optimizer, step); a resumed run starts from exactly
    those weights, and --critic-load of the save folder reads them too."""
    ckpts = tmp_path / "ckpts"
    ppo = ["--advantage-estimator", "ppo", "--gamma", "0.9", "--lambd", "0.95"]
    argv = base_argv(tiny_ckpt, prompts_file, tmp_path / "a", reward_file, 2) + ppo
    assert main([*argv, "--save", str(ckpts), "--save-interval", "1"]) == 0
    ckpt = latest_checkpoint(ckpts)
    state = torch.load(ckpt / "trainer.pt", weights_only=True)
    saved = state["critic"]["weights"]
    assert state["critic"]["step"] == 2 and float(saved["value_head.weight"].abs().sum()) > 0

    args, trainer = _trainer(tiny_ckpt, ppo)
    trainer.load_state_dict(state)
    assert all(torch.equal(trainer.critic.weights()[k], v) for k, v in saved.items())
    assert trainer.critic.step == 2
    _, fresh = _trainer(tiny_ckpt, [*ppo, "--critic-load", str(ckpts)])
    assert all(torch.equal(fresh.critic.weights()[k], v) for k, v in saved.items())

    # the resumed run trains on from the saved critic: its first value loss is that of the saved weights
    argv = base_argv(tiny_ckpt, prompts_file, tmp_path / "a", reward_file, 3) + ppo
    assert main([*argv, "--save", str(ckpts), "--load", str(ckpts)]) == 0
    resumed = torch.load(latest_checkpoint(ckpts) / "trainer.pt", weights_only=True)["critic"]
    assert resumed["step"] == 3
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/value_loss" in r and "train/critic_explained_variance" in r for r in rows)


def test_ppo_with_ray_is_refused(tiny_ckpt, prompts_file, reward_file, tmp_path, capsys):
    argv = base_argv(tiny_ckpt, prompts_file, tmp_path / "r", reward_file)
    err = error_of(capsys, [*argv, "--advantage-estimator", "ppo", "--use-ray"])
    assert "--advantage-estimator ppo trains its critic in the single-process trainer" in err


@pytest.mark.slow
def test_ppo_example_learns_the_demo_task(tmp_path):
    """examples/ppo.yaml (30 rollouts) lifts held-out greedy accuracy by at least 0.15."""
    summary, rows = run_example(tmp_path, "ppo.yaml")
    assert summary["accuracy_after"] >= summary["accuracy_before"] + 0.15, summary
    assert all("train/value_loss" in r for r in rows if "rollout/reward_mean" in r)
