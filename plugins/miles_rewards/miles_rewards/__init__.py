"""miles-rewards: the built-in reward functions of miles (math, gsm8k, dapo, deepscaler, f1, gpqa, ...).

Each reward is ``async def reward(args, sample) -> float | dict`` in its own module, registered under the
``miles.rewards`` entry-point group and chosen with ``--rm-type NAME``; ``plugin`` holds the hookimpls.
"""

__version__ = "0.1.0"
