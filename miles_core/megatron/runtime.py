"""Process-level set-up megatron-core needs: a `torch.distributed` world and its `parallel_state`.

A single-process run starts a gloo world of 1 through a file store, so no port is taken. megatron-core
0.16 assumes CUDA in a few places that a CPU forward reaches (the RNG tracker, `torch.cuda.current_device()`
as a device, a stream sync before checkpoint writes) and, without Transformer-Engine, reads an undefined
`te_general_gemm` in its router; `cpu_support` points those at the CPU (only where CUDA is absent) and
`te_absent_fix` defines the name, so the same GPTModel runs (slowly, in fp32) in CPU tests.
"""

from __future__ import annotations

import contextlib
import tempfile

import torch
import torch.distributed as dist


def te_absent_fix() -> None:
    """Define `moe_utils.te_general_gemm` as None where Transformer-Engine is missing, so the router
    takes its torch path (megatron-core 0.16.1 leaves the name undefined then)."""
    from megatron.core.transformer.moe import moe_utils

    if not moe_utils.HAVE_TE and not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def cpu_support() -> None:
    """Let megatron-core run on a CPU-only torch: no-op CUDA RNG state save/restore and fork (dropout is 0
    in this backend, and recompute then needs no RNG replay),
    `torch.cuda.current_device()` naming the CPU and a no-op `torch.cuda.synchronize`."""
    if torch.cuda.is_available():
        return
    from megatron.core.tensor_parallel import random as mrandom

    class _CpuTracker(mrandom.CudaRNGStatesTracker):
        def __init__(self) -> None:
            super().__init__()
            self._is_initialized = True

        @contextlib.contextmanager
        def fork(self, name: str = "") -> contextlib.AbstractContextManager:
            yield

        def add(self, name: str, seed: int) -> None:
            self.states_[name] = seed

    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda *args, **kwargs: None
    mrandom._CUDA_RNG_STATE_TRACKER = _CpuTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda device=None: None


def init_parallel(tp: int = 1, pp: int = 1, ep: int = 1, cp: int = 1, seed: int = 1234) -> None:
    """Start a world of one process (unless one is running) and megatron-core's parallel groups."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    te_absent_fix()
    cpu_support()
    if not dist.is_initialized():
        store = tempfile.NamedTemporaryFile(prefix="miles-megatron-", delete=False).name
        # gloo even on CUDA: a world of one never communicates (TP/EP of 1 skip their collectives), and
        # gloo also takes the CPU tensors of conversions and checkpoint planning.
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep,
            context_parallel_size=cp,
        )
    if torch.cuda.is_available():
        model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
