"""AdamW over bf16 model weights with fp32 master weights held by the optimizer (``--bf16``).

The model computes in bf16 end to end (no autocast, no per-forward weight casts, a bf16 residual
stream), as Megatron does with ``--bf16``. The optimizer keeps what must stay exact in fp32:

- ``master``: the fp32 weights. Each step updates them and rounds them into the bf16 model weights.
- ``main_grad``: the fp32 gradient of the step. After each micro-batch's backward the trainer calls
  `accumulate`, which moves the bf16 ``.grad`` of every parameter into it, so micro-batches add up in
  fp32 whatever their number.
- ``exp_avg`` / ``exp_avg_sq``: the AdamW moments, fp32.

`clip_grad_norm_` takes the norm of the step's fp32 gradient and hands the clip factor to the fused
AdamW kernel (no separate scaling pass and no host sync). A gradient that is still in ``.grad`` when
`step` runs (a plugin's, e.g. miles-specrl parks its MTP gradients until the step and clips them
itself) is applied as given, without the policy's clip factor.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


class MasterAdamW(torch.optim.Optimizer):
    """AdamW on fp32 master copies of low-precision parameters; see the module docstring.

    The parameters are cast to ``dtype`` in place (``p.data``) when the optimizer is built, so build it
    from the fp32 model: its weights become the masters exactly.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__(list(params), dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self._touched: set[torch.nn.Parameter] = set()  # got a main_grad this step
        self._grad_scale: torch.Tensor | None = None  # 1 / clip factor, on the device
        for group in self.param_groups:
            for p in group["params"]:
                master = p.detach().to(torch.float32, copy=True)
                self.state[p] = {
                    "step": torch.zeros((), dtype=torch.float32, device=p.device),
                    "master": master,
                    "exp_avg": torch.zeros_like(master),
                    "exp_avg_sq": torch.zeros_like(master),
                }
                p.data = p.data.to(dtype)
        self._main_grad = {p: None for g in self.param_groups for p in g["params"]}

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.param_groups for p in g["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Start a step: drops ``.grad`` and forgets the step's fp32 gradient (its memory is reused)."""
        for p in self.params:
            p.grad = None
        self._touched.clear()
        self._grad_scale = None

    @torch.no_grad()
    def accumulate(self) -> None:
        """Add every parameter's ``.grad`` into its fp32 ``main_grad`` and clear ``.grad``."""
        fresh = [p for p in self.params if p.grad is not None and p not in self._touched]
        more = [p for p in self.params if p.grad is not None and p in self._touched]
        for p in fresh:
            if self._main_grad[p] is None:
                self._main_grad[p] = torch.empty_like(self.state[p]["master"])
        if fresh:  # the first gradient of the step overwrites: no zeroing pass
            torch._foreach_copy_([self._main_grad[p] for p in fresh], [p.grad for p in fresh])
        if more:
            torch._foreach_add_([self._main_grad[p] for p in more], [p.grad for p in more])
        for p in fresh + more:
            p.grad = None
        self._touched.update(fresh)

    def main_grads(self) -> list[torch.Tensor]:
        """The step's fp32 gradients so far (after `accumulate`), in parameter order."""
        return [self._main_grad[p] for p in self.params if p in self._touched]

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Total 2-norm of the step's fp32 gradient (a device scalar); gradients above `max_norm` are
        scaled down by ``max_norm / (norm + 1e-6)`` inside `step`, as `torch.nn.utils.clip_grad_norm_`."""
        self.accumulate()
        grads = self.main_grads()
        if not grads:
            return torch.zeros((), device=self.params[0].device)
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        if max_norm != float("inf"):
            self._grad_scale = ((norm + 1e-6) / max_norm).clamp(min=1.0)
        return norm

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        if closure is not None:
            raise ValueError("MasterAdamW.step takes no closure")
        # Gradients still in .grad now (added after clipping, or restored by a plugin) go in unscaled.
        late = [p for p in self.params if p.grad is not None]
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            kw = dict(lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                      eps=group["eps"], amsgrad=False, maximize=False, found_inf=None)  # fmt: skip
            clipped = [p for p in group["params"] if p in self._touched and p.grad is None]
            own = [p for p in group["params"] if p.grad is not None]
            for ps, grads, scale in (
                (clipped, [self._main_grad[p] for p in clipped], self._grad_scale),
                (own, [self._own_grad(p) for p in own], None),
            ):
                if not ps:
                    continue
                states = [self.state[p] for p in ps]
                masters = [s["master"] for s in states]
                steps = [s["step"] for s in states]
                torch._foreach_add_(steps, 1.0)
                torch._fused_adamw_(
                    masters, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                    [], steps, grad_scale=scale, **kw,
                )  # fmt: skip
                torch._foreach_copy_([p.data for p in ps], masters)
        for p in late:
            p.grad = None
        self._touched.clear()
        self._grad_scale = None

    def _own_grad(self, p: torch.nn.Parameter) -> torch.Tensor:
        g = p.grad.float()
        if p in self._touched:  # also had clipped micro-batch gradients: those count, scaled
            main = self._main_grad[p]
            g = g + (main if self._grad_scale is None else main / self._grad_scale)
        return g

    # ------------------------------------------------------------------ checkpoints

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the masters, moments and steps in fp32 (torch's loader would cast them to the bf16
        parameter dtype) and round the masters into the parameters. A state saved by a plain fp32
        `torch.optim.AdamW` (no ``master``) keeps the masters taken from the loaded weights."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
            len(a["params"]) != len(b["params"]) for a, b in zip(saved_groups, self.param_groups)
        ):
            raise ValueError(
                "the optimizer state does not match the model's parameters (different model or "
                "plugins than the run that saved it)"
            )
        saved = state_dict["state"]
        with torch.no_grad():
            for group, sg in zip(self.param_groups, saved_groups):
                group.update({k: v for k, v in sg.items() if k != "params"})
                for p, i in zip(group["params"], sg["params"]):
                    for k, v in saved.get(i, {}).items():
                        own = self.state[p].get(k)
                        if own is not None and isinstance(v, torch.Tensor):
                            own.copy_(v.reshape(own.shape))
                    p.data.copy_(self.state[p]["master"])
