"""The torch train backend: log-probs agree with the engine's, micro-batching is exact, steps learn."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from miles_core.args import check_run_args, parse_args
from miles_core.data import Tokenizer
from miles_core.engine import Engine
from miles_core.loop import make_train_batch
from miles_core.model import load_model
from miles_core.plugins import get_plugin_manager
from miles_core.train.trainer import Trainer
from miles_core.types import Sample, Status


def make_args(ckpt, extra=()):
    argv = [
        "--hf-checkpoint",
        str(ckpt),
        "--prompt-data",
        "x.jsonl",
        "--rollout-batch-size",
        "2",
        "--n-samples-per-prompt",
        "4",
        "--num-rollout",
        "1",
        "--rm-type",
        "math",
        "--lr",
        "1e-3",
        "--rollout-temperature",
        "0.8",
        *extra,
    ]
    args = parse_args(argv, get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""}))
    check_run_args(args)
    return args


def rollout(ckpt, args, seed=0) -> list[Sample]:
    tok = Tokenizer.from_pretrained(ckpt)
    engine = Engine(load_model(ckpt), tok, max_batch_size=8, seed=seed)
    samples = []
    for g, text in enumerate(["What is 12+30?", "What is 77-5?"]):
        prompt = tok.encode(text)
        outs = engine.generate_batch([prompt] * 4, {"temperature": 0.8, "max_new_tokens": 8})
        for i, o in enumerate(outs):
            samples.append(
                Sample(
                    group_index=g,
                    index=4 * g + i,
                    tokens=prompt + o.output_ids,
                    response_length=len(o.output_ids),
                    rollout_log_probs=o.log_probs,
                    loss_mask=[1] * len(o.output_ids),
                    reward=float(i % 2),
                    status=Status.COMPLETED,
                    sampling_params=o.sampling_params,
                )
            )
    return samples


def test_trainer_log_probs_equal_engine(tiny_ckpt):
    # The trainer tempers with what each sample was drawn at (0.8, reported by the engine), not with the
    # run's --rollout-temperature.
    args = make_args(tiny_ckpt, ["--micro-batch-size", "2", "--rollout-temperature", "1.0"])
    samples = rollout(tiny_ckpt, args)
    assert {s.sampling_params["temperature"] for s in samples} == {0.8}
    batch = make_train_batch(samples, args)
    trainer = Trainer(args, get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""}), load_model(tiny_ckpt))
    old = trainer.compute_log_probs(batch, "old")
    for o, r in zip(old, batch.rollout_log_probs):
        assert torch.allclose(o, r, atol=1e-5)


@pytest.mark.parametrize("per_token", [False, True])
def test_micro_batching_gives_the_same_gradient(tiny_ckpt, per_token):
    extra = ["--calculate-per-token-loss"] if per_token else []
    pm = get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""})
    grads = []
    for mbs in ("1", "8"):
        args = make_args(tiny_ckpt, ["--micro-batch-size", mbs, *extra])
        batch = make_train_batch(rollout(tiny_ckpt, args), args)
        trainer = Trainer(args, pm, load_model(tiny_ckpt))
        trainer.optimizer.step = lambda: None  # keep weights fixed; inspect the accumulated gradient
        metrics = trainer.train(0, batch)[0]
        grads.append(torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None]))
        assert metrics["grad_norm"] > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_step_raises_likelihood_of_rewarded_samples(tiny_ckpt):
    args = make_args(tiny_ckpt, ["--micro-batch-size", "4"])
    batch = make_train_batch(rollout(tiny_ckpt, args), args)
    pm = get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""})
    trainer = Trainer(args, pm, load_model(tiny_ckpt))
    metrics = trainer.train(0, batch)[0]
    for key in (
        "pg_loss",
        "pg_clipfrac",
        "ppo_kl",
        "kl_loss",
        "entropy",
        "grad_norm",
        "train_rollout_logprob_abs_diff",
        "train_rollout_kl",
        "tis_clipfrac",
    ):
        assert key in metrics
    before = [x.sum() for x in batch.old_log_probs]
    after = [x.sum() for x in trainer.compute_log_probs(batch, "old")]
    up = [a - b for a, b, s in zip(after, before, batch.samples) if s.reward > 0]
    down = [a - b for a, b, s in zip(after, before, batch.samples) if s.reward == 0]
    assert sum(up) / len(up) > sum(down) / len(down)


def test_failed_samples_do_not_train(tiny_ckpt):
    args = make_args(tiny_ckpt)
    samples = rollout(tiny_ckpt, args)
    samples[0].status = Status.FAILED
    batch = make_train_batch(samples, args)
    assert batch.loss_masks[0].sum() == 0
    assert batch.rewards[0] == pytest.approx(batch.rewards[1:4].mean())


def test_kl_loss_uses_reference_model(tiny_ckpt):
    args = make_args(tiny_ckpt, ["--use-kl-loss", "--kl-loss-coef", "0.1", "--kl-loss-type", "low_var_kl"])
    pm = get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""})
    policy = load_model(tiny_ckpt)
    trainer = Trainer(args, pm, policy, copy.deepcopy(policy).requires_grad_(False))
    batch = make_train_batch(rollout(tiny_ckpt, args), args)
    first = trainer.train(0, batch)[0]
    assert first["kl_loss"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before any update
    second = trainer.train(1, make_train_batch(rollout(tiny_ckpt, args, seed=1), args))[0]
    assert second["kl_loss"] > 0


def test_compiled_layers_train_like_eager_layers_over_changing_packings(tiny_ckpt):
    """--train-compile: same metrics and weights (fp32 rounding) over steps whose packings differ, and
    no new graph for a new packing once shapes went dynamic (the packed attention call stays eager)."""
    from torch._dynamo.utils import counters

    pm = get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""})
    results = []
    for compile_flag in ([], ["--train-compile"]):
        args = make_args(tiny_ckpt, ["--use-dynamic-batch-size", "--max-tokens-per-gpu", "40", *compile_flag])
        trainer = Trainer(args, pm, load_model(tiny_ckpt))
        counters.clear()
        metrics, graphs = [], []
        for i in range(4):
            metrics.append(trainer.train(i, make_train_batch(rollout(tiny_ckpt, args, seed=i), args))[0])
            graphs.append(counters["stats"]["unique_graphs"])
        results.append((metrics, [p.detach().clone() for p in trainer.model.parameters()]))
    (m_eager, w_eager), (m_comp, w_comp) = results
    for a, b in zip(m_eager, m_comp):
        assert a["pg_loss"] == pytest.approx(b["pg_loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert max((a - b).abs().max().item() for a, b in zip(w_eager, w_comp)) < 1e-4
    # Compiled: the first steps compile (static, then dynamic shapes); later packings reuse the graphs.
    assert graphs[0] > 0 and graphs[3] == graphs[2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_compiled_layers_on_cuda_over_changing_packings(tiny_ckpt):
    """--bf16 --train-compile on CUDA (bf16 weights, fp32 masters, the packed Triton attention inside
    the compiled layer, Triton log-prob kernels): the eager path's metrics to bf16 accuracy, and a new
    packing (other sequence count and lengths) compiles nothing new after the first steps."""
    from torch._dynamo.utils import counters

    pm = get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""})
    results = []
    for compile_flag in ([], ["--train-compile"]):
        flags = ["--use-dynamic-batch-size", "--max-tokens-per-gpu", "40", "--bf16", *compile_flag]
        args = make_args(tiny_ckpt, flags)
        trainer = Trainer(args, pm, load_model(tiny_ckpt, device="cuda"))
        counters.clear()
        metrics, graphs = [], []
        for i in range(5):
            metrics.append(trainer.train(i, make_train_batch(rollout(tiny_ckpt, args, seed=i), args))[0])
            graphs.append(counters["stats"]["unique_graphs"])
        results.append((metrics, graphs))
    (m_eager, _), (m_comp, graphs) = results
    for a, b in zip(m_eager, m_comp):
        assert a["pg_loss"] == pytest.approx(b["pg_loss"], abs=2e-2)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=5e-2)
    assert graphs[0] > 0 and graphs[4] == graphs[2]


# -------------------------------------------------------------------------------- loss terms, by hand
# At the first step of a rollout the policy is the "old" policy (ratio 1, nothing clipped), so each
# gradient below can be predicted exactly from the gradient of a plain step. Grad clipping is off so the
# gradients the step leaves on the parameters are the loss gradients themselves.

NO_CLIP = ["--micro-batch-size", "4", "--clip-grad", "0"]


def _flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat(
        [torch.zeros(p.numel()) if p.grad is None else p.grad.flatten() for p in model.parameters()]
    )


def _step_grad(ckpt, samples, extra, ref_model=None):
    """(gradient, metrics) of one train step on `samples` from the checkpoint's weights."""
    args = make_args(ckpt, [*NO_CLIP, *extra])
    pm = get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""})
    trainer = Trainer(args, pm, load_model(ckpt), ref_model)
    metrics = trainer.train(0, make_train_batch(copy.deepcopy(samples), args))[0]
    return _flat_grad(trainer.model), metrics


def _off_policy(samples, ratio):
    """The samples with rollout log-probs shifted so that the train/rollout ratio exp(old - rollout)
    is `ratio` on every token (the trainer's old log-probs equal the engine's to ~1e-6)."""
    out = copy.deepcopy(samples)
    for s in out:
        s.rollout_log_probs = [lp - math.log(ratio) for lp in s.rollout_log_probs]
    return out


@pytest.fixture(scope="module")
def plain_samples(tiny_ckpt):
    return rollout(tiny_ckpt, make_args(tiny_ckpt))


@pytest.fixture(scope="module")
def plain_grad(tiny_ckpt, plain_samples):
    """The gradient of the first step without corrections (the rollout log-probs play no part in it)."""
    return _step_grad(tiny_ckpt, plain_samples, [])[0]


@pytest.mark.parametrize(
    "flags,ratio,weight,metric",
    [
        (["--use-tis"], 0.5, 0.5, ("tis_weight_mean", 0.5)),
        (["--use-tis", "--tis-clip", "2.0"], 3.0, 2.0, ("tis_weight_mean", 2.0)),  # clipped at 2
        (["--use-icepop"], 2.0, 2.0, ("icepop_maskfrac", 0.0)),  # inside [0.5, 5]: weighted by the ratio
        (["--use-icepop"], 8.0, 0.0, ("icepop_maskfrac", 1.0)),  # outside: no policy gradient at all
    ],
    ids=["tis", "tis-clipped", "icepop-kept", "icepop-dropped"],
)
def test_mismatch_correction_reweights_the_step(
    tiny_ckpt, plain_samples, plain_grad, flags, ratio, weight, metric
):
    """--use-tis / --use-icepop with rollout log-probs off the trainer's: every token's loss is weighted
    by the (clipped / windowed) ratio, so the step's gradient is the uncorrected step's times that
    weight, and the correction reports its metrics."""
    g_corr, metrics = _step_grad(tiny_ckpt, _off_policy(plain_samples, ratio), flags)
    assert plain_grad.norm() > 0
    torch.testing.assert_close(g_corr, weight * plain_grad, atol=1e-7, rtol=1e-4)
    assert metrics[metric[0]] == pytest.approx(metric[1], rel=1e-4)
    assert metrics["train_rollout_logprob_abs_diff"] == pytest.approx(abs(math.log(ratio)), rel=1e-4)


def _perturbed(model, scale=0.03, seed=7):
    """A reference model: `model`'s weights plus noise, frozen."""
    ref = copy.deepcopy(model).requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return ref.eval()


def _response_log_probs(model, tokens, r):
    """Log-probs of the last `r` tokens under a plain forward of `tokens[:-1]` (temperature 1)."""
    logits = model(tokens[:-1][None]).logits[0, -r:].float()
    return torch.log_softmax(logits, -1).gather(-1, tokens[-r:, None])[:, 0]


def _hand_low_var_kl(policy, ref, batch):
    """The step's KL term from plain forwards: per token the low_var_kl estimate from log pi - log ref
    at the sampled response tokens, each sample's masked mean, averaged over the samples."""
    total = 0.0
    for tokens, mask, s in zip(batch.tokens, batch.loss_masks, batch.samples):
        logp = _response_log_probs(policy, tokens, s.response_length)
        with torch.no_grad():
            ref_logp = _response_log_probs(ref, tokens, s.response_length)
        log_ratio = logp - ref_logp
        kl = (torch.exp(-log_ratio) - 1 + log_ratio).clamp(-10, 10)  # k3, clamped
        total = total + (kl * mask).sum() / mask.sum().clamp(min=1)
    return total / len(batch)


def test_kl_loss_gradient_is_pg_gradient_plus_coef_times_kl_gradient(tiny_ckpt, plain_samples):
    """--use-kl-loss against a reference model that differs from the policy: the step's gradient is the
    plain step's plus kl_loss_coef times the gradient of KL(policy || ref) computed by hand, and kl_loss
    reports that KL (so neither the sign of the term nor the direction of the estimator can flip)."""
    coef, kl_type = 0.5, "low_var_kl"  # not symmetric: swapping policy and reference changes it
    ref = _perturbed(load_model(tiny_ckpt))
    # The hand-computed log-probs are those of the plain logits: samples drawn at temperature 1.
    samples = copy.deepcopy(plain_samples)
    for s in samples:
        s.sampling_params = {**s.sampling_params, "temperature": 1.0}
    kl_flags = ["--use-kl-loss", "--kl-loss-coef", str(coef), "--kl-loss-type", kl_type]
    g_plain, _ = _step_grad(tiny_ckpt, samples, [])
    g_step, metrics = _step_grad(tiny_ckpt, samples, kl_flags, ref_model=ref)

    policy = load_model(tiny_ckpt)
    batch = make_train_batch(copy.deepcopy(samples), make_args(tiny_ckpt, kl_flags))
    kl = _hand_low_var_kl(policy, ref, batch)
    kl.backward()
    g_kl = _flat_grad(policy)
    assert abs(kl.item()) > 1e-3 and coef * g_kl.norm() > 0.1 * g_plain.norm()  # the term matters
    assert metrics["kl_loss"] == pytest.approx(kl.item(), rel=1e-4)
    torch.testing.assert_close(g_step, g_plain + coef * g_kl, atol=1e-6, rtol=1e-4)
