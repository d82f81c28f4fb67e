"""`miles convert --to torch_dist` / `--from torch_dist`: HF checkpoints <-> Megatron distributed
checkpoints, laid out as slime's `tools/convert_hf_to_torch_dist.py` writes them.

A ``--save``-style folder holds ``latest_checkpointed_iteration.txt`` ("release", or an iteration number)
and the checkpoint in ``release/`` (or ``iter_%07d/``): megatron-core's `dist_checkpointing` format
with the torch_dist backend (``.metadata``, ``__0_0.distcp``, ``common.pt``, ``metadata.json``). The
state is ``{"model": GPTModel.sharded_state_dict(), "checkpoint_version": 3.0, "iteration": 0}``; its
tensors are stored whole, so Megatron loads them at any TP/PP/EP. The write goes through the same
translation and save planner as megatron-core's own torch_dist strategy, with torch's synchronous file
writer instead of its forked writer processes (which hang on a CPU-only torch).
"""

from __future__ import annotations

from pathlib import Path

import torch

from miles_core.atomic import atomic_dir
from miles_core.megatron.backend import MegatronCausalLM
from miles_core.megatron.config import build_gpt_model, one_process_args
from miles_core.megatron.runtime import init_parallel
from miles_core.model import load_config, load_model, named_hf_tensors, set_config_dtype, write_hf_checkpoint
from miles_core.types import UsageError

TRACKER = "latest_checkpointed_iteration.txt"


def _sync_strategy():
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    class SyncTorchDistSave(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir):  # noqa: ANN001
            state, _, _ = _replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, self.keep_only_main_replica
            )
            planner = MCoreSavePlanner(
                dedup_replicated_tensors=not self.keep_only_main_replica, flatten_state_dict=False
            )
            dcp_save(
                mcore_to_pyt_state_dict(state, False),
                storage_writer=FileSystemWriter(checkpoint_dir),
                planner=planner,
            )

    return SyncTorchDistSave("torch_dist", 1)


def checkpoint_dir(folder: Path) -> Path:
    """The iteration folder of a torch_dist ``folder`` (a --save folder, or the iteration folder itself)."""
    if (folder / "metadata.json").is_file():
        return folder
    tracker = folder / TRACKER
    if not tracker.is_file():
        raise UsageError(
            f"--input-dir {folder} holds neither {TRACKER} nor metadata.json; point it at a torch_dist "
            "checkpoint (a Megatron --save folder or its release/ or iter_N/ folder)."
        )
    name = tracker.read_text().strip()
    sub = folder / ("release" if name == "release" else f"iter_{int(name):07d}")
    if not (sub / "metadata.json").is_file():
        raise UsageError(
            f"{tracker} names {sub.name}, which holds no torch_dist checkpoint; check the folder."
        )
    return sub


def hf_to_torch_dist(hf_dir: str, out_dir: str) -> None:
    """Write the HF checkpoint ``hf_dir`` as a torch_dist checkpoint folder ``out_dir`` (atomically)."""
    from megatron.core import dist_checkpointing

    init_parallel()
    model = load_model(hf_dir, dtype=torch.float32, device="cpu")
    gpt = MegatronCausalLM.from_hf_tensors(
        model.config, dict(named_hf_tensors(model)), one_process_args()
    ).model
    with atomic_dir(out_dir) as tmp:
        (tmp / "release").mkdir()
        state = {"model": gpt.sharded_state_dict(), "checkpoint_version": 3.0, "iteration": 0}
        dist_checkpointing.save(state, str(tmp / "release"), sharded_strategy=_sync_strategy())
        (tmp / TRACKER).write_text("release")


def torch_dist_to_hf(input_dir: str, hf_dir: str, out_dir: str) -> None:
    """Write the torch_dist checkpoint ``input_dir`` as an HF folder ``out_dir``; ``hf_dir`` gives the
    config.json and tokenizer (the checkpoint the model came from)."""
    from megatron.core import dist_checkpointing

    init_parallel()
    cfg = load_config(hf_dir)
    gpt = build_gpt_model(cfg, one_process_args())
    loaded = dist_checkpointing.load(
        {"model": gpt.sharded_state_dict()}, str(checkpoint_dir(Path(input_dir)))
    )
    gpt.load_state_dict(loaded["model"], strict=True)
    tensors = MegatronCausalLM(cfg, gpt).hf_tensors()
    config = cfg.to_hf()
    # Back in the dtype the HF checkpoint had (Megatron's state is fp32 here, so bf16 comes back exact).
    named = config.get("torch_dtype") or config.get("dtype") or "float32"
    dtype = (
        getattr(torch, named) if isinstance(getattr(torch, str(named), None), torch.dtype) else torch.float32
    )
    set_config_dtype(config, dtype)
    write_hf_checkpoint(tensors, config, out_dir, tokenizer_src=hf_dir, dtype=dtype)
