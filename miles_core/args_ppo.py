"""The `miles train` flag families of PPO's critic and of DAPO's dynamic sampling, in slime's names and
defaults, and the checks of their values (`check_ppo_args`, run by `miles_core.validate.validate`).

``--gamma`` (the algorithm family) is shared: the discount of REINFORCE++'s returns and of PPO's GAE.
"""

from __future__ import annotations

import argparse

from miles_core.errors import UsageError


def add_ppo(p: argparse.ArgumentParser) -> None:
    """Add the ``ppo critic`` and ``dynamic sampling`` groups."""
    g = p.add_argument_group("ppo critic (--advantage-estimator ppo)")
    g.add_argument("--lambd", type=float, default=1.0, help="GAE lambda of PPO (--gamma discounts).")
    g.add_argument(
        "--value-clip",
        type=float,
        default=0.2,
        help="Clip of the value loss: a new value moves at most this far from the rollout's before the "
        "clipped term takes over (max of the clipped and unclipped squared errors).",
    )
    g.add_argument(
        "--critic-load",
        type=str,
        default=None,
        help="Start the critic from an HF checkpoint folder (fresh value head) or from the newest checkpoint "
        "of a PPO run's --save folder (default: the policy's --hf-checkpoint with a fresh head).",
    )
    g.add_argument("--critic-lr", type=float, default=None, help="Critic learning rate (default: --lr).")
    g.add_argument(
        "--num-critic-only-steps",
        type=int,
        default=0,
        help="The first N rollouts train only the critic (the policy stays as it is).",
    )
    d = p.add_argument_group("dynamic sampling (DAPO)")
    d.add_argument(
        "--over-sampling-batch-size",
        type=int,
        default=None,
        help="Prompts drawn per sampling round (default: --rollout-batch-size); rounds go on until "
        "--rollout-batch-size groups pass the filter.",
    )
    d.add_argument(
        "--dynamic-sampling-filter-path",
        type=str,
        default=None,
        help="Filter of each prompt's group: a miles.filters name (check_reward_nonzero_std), slime's "
        "slime.rollout.filter_hub.dynamic_sampling_filters.check_reward_nonzero_std, or file.py:func, "
        "pkg.mod:func, pkg.mod.func returning a bool or an object with .keep.",
    )


def check_ppo_args(args: argparse.Namespace) -> None:
    """Refuse critic flags without ``ppo`` and values out of range (``--critic-lr`` stays None when unset:
    the critic then uses ``--lr``, and a resumed run does not see a changed flag)."""
    ppo = args.advantage_estimator == "ppo"
    for dest, off in (("critic_load", None), ("critic_lr", None), ("num_critic_only_steps", 0)):
        if vars(args)[dest] != off and not ppo:
            flag = "--" + dest.replace("_", "-")
            raise UsageError(
                f"{flag} acts on the critic, which only --advantage-estimator ppo trains; "
                f"add that or drop {flag}."
            )
    if ppo and args.use_ray:
        raise UsageError(
            "--advantage-estimator ppo trains its critic in the single-process trainer; drop --use-ray and "
            "the multi-process layout flags."
        )
    for dest in ("gamma", "lambd"):
        if not 0.0 <= vars(args)[dest] <= 1.0:
            raise UsageError(f"--{dest} must be in [0, 1], got {vars(args)[dest]}.")
    if args.value_clip <= 0:
        raise UsageError(f"--value-clip must be positive, got {args.value_clip}.")
    if args.num_critic_only_steps < 0:
        raise UsageError(f"--num-critic-only-steps must be 0 or more, got {args.num_critic_only_steps}.")
    if args.critic_lr is not None and args.critic_lr < 0:
        raise UsageError(f"--critic-lr must be 0 or more, got {args.critic_lr}.")
    if args.over_sampling_batch_size is not None and args.over_sampling_batch_size < 1:
        n = args.over_sampling_batch_size
        raise UsageError(f"--over-sampling-batch-size must be at least 1, got {n}.")
    spec = args.dynamic_sampling_filter_path
    if spec and spec.endswith("check_reward_nonzero_std") and args.n_samples_per_prompt < 2:
        raise UsageError(
            "--dynamic-sampling-filter-path check_reward_nonzero_std keeps groups whose rewards differ, "
            "which a group of one sample never has; raise --n-samples-per-prompt to 2 or more."
        )
