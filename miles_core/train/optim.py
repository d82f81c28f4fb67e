"""AdamW over bf16 model weights with fp32 master weights held by the optimizer (``--bf16``).

The model computes in bf16 end to end (no autocast, no per-forward weight casts, a bf16 residual
stream), as Megatron does with ``--bf16``. The optimizer keeps what must stay exact in fp32: the master
weights, the AdamW moments and, when a step has several micro-batches, their gradient sum.

Layout (per parameter group): every parameter, its ``.grad``, its master and its moments are views
into one flat buffer each, so a step is a handful of kernels whatever the number of tensors:

- backward accumulates each parameter's bf16 gradient in place into the flat gradient buffer;
- `accumulate` (the trainer calls it after each micro-batch) moves it into an fp32 sum when more
  micro-batches follow, so micro-batches add up in fp32;
- `clip_grad_norm_` is one norm over the flat gradient; the clip factor stays on the device;
- `step` is one fused elementwise pass (compiled on CUDA): AdamW on the fp32 masters, rounded into
  the bf16 weights in the same pass.

A parameter with a post-accumulate-grad hook (a plugin that takes its gradient away after each
backward, e.g. a plugin's draft heads trained on their own) is kept out of the flat buffers: it gets its
own per-tensor AdamW in `step`, with whatever ``.grad`` the plugin puts back, unscaled by the policy's
clip factor.

`lr_at` is the learning-rate schedule (warmup, then constant / linear / cosine decay) of the policy's
and the critic's optimizers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from miles_core.devices import to_device


def lr_at(args: Any, base_lr: float, step: int, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total_steps``: ``--lr-warmup-iters``
    of linear warmup to ``base_lr``, then ``--lr-decay-style`` down to ``--min-lr``."""
    warmup = args.lr_warmup_iters
    if warmup and step < warmup:
        return base_lr * (step + 1) / warmup
    frac = min(1.0, max(0, step - warmup) / max(1, total_steps - warmup))
    if args.lr_decay_style == "linear":
        return args.min_lr + (base_lr - args.min_lr) * (1 - frac)
    if args.lr_decay_style == "cosine":
        return args.min_lr + (base_lr - args.min_lr) * 0.5 * (1 + math.cos(math.pi * frac))
    return base_lr


def adamw_update(master, exp_avg, exp_avg_sq, grad, param, hyper, grad_scale) -> None:
    """One AdamW step on flat fp32 ``master`` / moments from ``grad`` (any float dtype) divided by
    ``grad_scale`` (a device scalar), writing the rounded weights into ``param``. ``hyper`` is an fp32
    device tensor ``[lr, beta1, beta2, eps, weight_decay, 1 - beta1^t, sqrt(1 - beta2^t)]``. Same
    arithmetic as `torch.optim.AdamW`."""
    lr, beta1, beta2, eps, wd, bc1, bc2_sqrt = hyper.unbind()
    g = grad.float() / grad_scale
    m = exp_avg * beta1 + g * (1 - beta1)
    v = exp_avg_sq * beta2 + g * g * (1 - beta2)
    w = master * (1 - lr * wd)
    w = w - (lr / bc1) * m / (v.sqrt() / bc2_sqrt + eps)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    master.copy_(w)
    param.copy_(w)


def cast_weights(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast floating-point parameters in place; buffers (e.g. a quantizer's scales) keep their dtype."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


_COMPILED_UPDATE: list = []


def _update_fn(device: torch.device):
    """`adamw_update` compiled into one kernel on CUDA (eager elsewhere)."""
    if device.type != "cuda":
        return adamw_update
    if not _COMPILED_UPDATE:
        _COMPILED_UPDATE.append(torch.compile(adamw_update, dynamic=True))
    return _COMPILED_UPDATE[0]


class _Flat:
    """One parameter group's flat buffers and its parameters' offsets into them."""

    def __init__(self, params: list[torch.nn.Parameter], dtype: torch.dtype) -> None:
        self.params = params
        self.offset: dict[torch.nn.Parameter, int] = {}
        n = 0
        for p in params:
            self.offset[p] = n
            n += p.numel()
        dev = params[0].device
        self.master = torch.empty(n, dtype=torch.float32, device=dev)
        for p in params:
            self.view(self.master, p).copy_(p.detach())
        self.exp_avg = torch.zeros_like(self.master)
        self.exp_avg_sq = torch.zeros_like(self.master)
        self.weight = self.master.to(dtype)
        self.grad = torch.zeros(n, dtype=dtype, device=dev)
        self.main: torch.Tensor | None = None  # fp32 gradient sum, allocated on first use
        self.main_used = False  # this step's gradient is (partly) in `main`
        self.step = torch.zeros((), dtype=torch.float32)  # host: the bias corrections need no sync
        self.grad_views = [self.view(self.grad, p) for p in params]  # made once: views cost host time
        for p, g in zip(params, self.grad_views):
            p.data = self.view(self.weight, p)
            p.grad = g

    def view(self, flat: torch.Tensor, p: torch.nn.Parameter) -> torch.Tensor:
        o = self.offset[p]
        return flat[o : o + p.numel()].view(p.shape)

    def collect(self) -> None:
        """Fold a ``.grad`` that something replaced (instead of accumulating into ours) back in."""
        for p, mine in zip(self.params, self.grad_views):
            g = p.grad
            if g is not mine:
                if g is not None:
                    mine.add_(g.reshape(mine.shape))
                p.grad = mine


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
        self._flat: list[_Flat | None] = []
        self._hooked: list[list[torch.nn.Parameter]] = []
        self._grad_scale: torch.Tensor | None = None  # the policy's clip divisor, on the device
        for group in self.param_groups:
            hooked = [p for p in group["params"] if getattr(p, "_post_accumulate_grad_hooks", None)]
            flat = [p for p in group["params"] if all(p is not h for h in hooked)]
            self._hooked.append(hooked)
            self._flat.append(_Flat(flat, dtype) if flat else None)
            if flat:
                f = self._flat[-1]
                for p in flat:
                    self.state[p] = {
                        "step": f.step, "master": f.view(f.master, p),
                        "exp_avg": f.view(f.exp_avg, p), "exp_avg_sq": f.view(f.exp_avg_sq, p),
                    }  # fmt: skip
            for p in hooked:
                master = p.detach().to(torch.float32, copy=True)
                self.state[p] = {
                    "step": torch.zeros((), dtype=torch.float32, device=p.device), "master": master,
                    "exp_avg": torch.zeros_like(master), "exp_avg_sq": torch.zeros_like(master),
                }  # fmt: skip
                p.data = p.data.to(dtype)

    def _flats(self) -> list[_Flat]:
        return [f for f in self._flat if f is not None]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Start a step: zero the flat gradients (the parameters' ``.grad`` stay views into them)."""
        for f in self._flats():
            f.grad.zero_()
            f.main_used = False
            for p, g in zip(f.params, f.grad_views):
                if p.grad is not g:
                    p.grad = g
        for ps in self._hooked:
            for p in ps:
                p.grad = None
        self._grad_scale = None

    @torch.no_grad()
    def accumulate(self, last: bool = False) -> None:
        """After a micro-batch's backward. Unless it was the step's `last`, its bf16 gradient is added
        into the fp32 sum and cleared for the next one; the last stays in bf16 (read by the step)
        when it is the only one."""
        for f in self._flats():
            f.collect()
            if last and not f.main_used:
                continue
            if f.main is None:
                f.main = torch.empty_like(f.master)
            if f.main_used:
                f.main.add_(f.grad)
            else:
                f.main.copy_(f.grad)
                f.main_used = True
            f.grad.zero_()

    def _grad_of(self, f: _Flat) -> torch.Tensor:
        return f.main if f.main_used else f.grad

    def main_grads(self) -> list[torch.Tensor]:
        """The step's gradient so far (after `accumulate`), one flat tensor per parameter group."""
        return [self._grad_of(f).float() for f in self._flats()]

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Total 2-norm of the step's gradient (a device scalar); gradients above `max_norm` are scaled
        down by ``max_norm / (norm + 1e-6)`` inside `step`, as `torch.nn.utils.clip_grad_norm_`."""
        flats = self._flats()
        for f in flats:
            f.collect()
        if not flats:
            return torch.zeros((), device=self.param_groups[0]["params"][0].device)
        norms = [torch.linalg.vector_norm(self._grad_of(f), dtype=torch.float32) for f in flats]
        norm = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
        if max_norm != float("inf"):
            self._grad_scale = ((norm + 1e-6) / max_norm).clamp(min=1.0)
        return norm

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        if closure is not None:
            raise ValueError("MasterAdamW.step takes no closure")
        for group, f, hooked in zip(self.param_groups, self._flat, self._hooked):
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            if f is not None:
                f.collect()
                f.step += 1
                t = float(f.step)
                hyper = torch.tensor(
                    [lr, beta1, beta2, eps, wd, 1 - beta1**t, math.sqrt(1 - beta2**t)], dtype=torch.float32
                )
                dev = f.master.device
                scale = self._grad_scale if self._grad_scale is not None else torch.ones((), device=dev)
                _update_fn(dev)(
                    f.master, f.exp_avg, f.exp_avg_sq, self._grad_of(f), f.weight, to_device(hyper, dev),
                    scale.to(dev),
                )  # fmt: skip
            own = [p for p in hooked if p.grad is not None]
            if own:  # a plugin's gradients, applied as given
                states = [self.state[p] for p in own]
                masters, steps = [s["master"] for s in states], [s["step"] for s in states]
                torch._foreach_add_(steps, 1.0)
                torch._fused_adamw_(
                    masters, [p.grad.float() for p in own], [s["exp_avg"] for s in states],
                    [s["exp_avg_sq"] for s in states], [], steps, lr=lr, beta1=beta1, beta2=beta2,
                    weight_decay=wd, eps=eps, amsgrad=False, maximize=False, grad_scale=None,
                    found_inf=None,
                )  # fmt: skip
                torch._foreach_copy_([p.data for p in own], masters)
                for p in own:
                    p.grad = None
        self._grad_scale = None

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
