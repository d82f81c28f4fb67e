"""miles-r3: rollout routing replay. The rollout engine's expert choices are recorded per token and
replayed in every training-side forward, so MoE RL trains on the experts that sampled the tokens.

Hooks: ``miles_r3.plugin`` (the ``r3`` entry point of ``miles.plugins``); route tables and SGLang
decoding: ``miles_r3.routes``; per-run policy: ``miles_r3.replay``. Kept import-free so loading the
plugin stays cheap.
"""

__version__ = "0.1.0"
