"""miles-specrl: speculative rollout with DeepSeek-V3-style MTP draft heads, trained online during RL.

`plugin` holds the hookimpls; `mtp` the heads and their checkpoint I/O; `drafters` and `speculator` the
engine side; `training` the MTP loss.
"""

__version__ = "0.1.0"
