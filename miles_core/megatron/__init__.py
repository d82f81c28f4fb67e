"""The Megatron-core train backend (``--train-backend megatron``), installed by the ``megatron`` extra.

`config` maps an HF `config.json` onto megatron-core's `TransformerConfig`, `weights` converts HF
tensors to and from Megatron's fused layout (sharded by TP/EP), `backend` trains a `GPTModel` with the
built-in trainer's losses and hooks. Nothing here imports megatron-core until it is used, so the core
imports without it and `require` names the extra that installs it.
"""

from __future__ import annotations

from types import ModuleType

from miles_core.errors import UsageError

EXTRA_HINT = "pip install 'miles-core[megatron]'"


def require() -> ModuleType:
    """`megatron.core`, or a `UsageError` naming the extra that installs it."""
    try:
        import megatron.core as mcore
    except ImportError as e:
        raise UsageError(
            f"--train-backend megatron needs megatron-core, which is not installed ({e}); install it with "
            f"{EXTRA_HINT}."
        ) from e
    return mcore
