"""The rollout manager: prompts -> engine (via the generate function) -> reward -> samples.

One call of `generate` is one rollout: ``rollout_batch_size`` prompts, ``n_samples_per_prompt``
samples each, all launched at once so the engine batches them, each rewarded as soon as it finishes.
What the generate function returns is checked before it is rewarded (`miles_core.rollout.checks`): a bad
result fails its sample, and a rollout in which every sample failed stops the run. A sample whose engine
call outlived ``--rollout-timeout`` is ABORTED: kept in its group unrewarded, with a zero loss mask. A
sample with a token older than ``--max-weight-staleness`` allows is failed rather than trained on.
`evaluate` does the same over the eval sets without advancing the training data.

Both run on whichever thread calls them, each rollout on an event loop (``agenerate`` / ``aevaluate`` on
the caller's own, e.g. the rollout thread of ``--async``).
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
import uuid
from typing import Any

from miles_core.custom import get_generate_fn, load_function
from miles_core.logging import get_logger, progress
from miles_core.rollout.checks import (
    FailureLog,
    SampleError,
    blank_response,
    checked_samples,
    raised,
    sample_problem,
)
from miles_core.rollout.dumps import save_rollout
from miles_core.rollout.dynamic_sampling import DynamicSampler
from miles_core.rollout.eval_sets import pass_at_k_metrics
from miles_core.rollout.generate import RolloutContext, current_context, rollout_context
from miles_core.rollout.reward import RewardRunner
from miles_core.rollout.rollout_fn import RolloutDataSource, call_rollout_fn, finish_groups
from miles_core.types import EXCLUDED, RolloutOptions, Sample, Status, UsageError

log = get_logger(__name__)


def sampling_params(args: argparse.Namespace, evaluation: bool = False) -> dict[str, Any]:
    """SGLang-style sampling parameters from the rollout (or eval) flags."""

    def pick(eval_value, value):
        return value if not evaluation or eval_value is None else eval_value

    return {
        "temperature": pick(args.eval_temperature, args.rollout_temperature),
        "top_p": pick(args.eval_top_p, args.rollout_top_p),
        "top_k": pick(args.eval_top_k, args.rollout_top_k),
        "max_new_tokens": pick(args.eval_max_response_len, args.rollout_max_response_len),
        "stop": args.rollout_stop,
        "stop_token_ids": args.rollout_stop_token_ids,
    }


def rollout_options(pm: Any, args: argparse.Namespace, rollout_id: int, engine: Any) -> RolloutOptions:
    """Ask every plugin's ``pre_rollout`` and merge the answers: route capture if any asks for it, the
    one decode strategy offered (two are an error)."""
    answers = [
        a for a in pm.hook.pre_rollout(args=args, rollout_id=rollout_id, engine=engine) if a is not None
    ]
    strategies = [a.decode_strategy for a in answers if a.decode_strategy is not None]
    if len(strategies) > 1:
        names = ", ".join(type(s).__name__ for s in strategies)
        raise UsageError(
            f"two plugins each replace the engine's decode step ({names}); turn one of them off."
        )
    return RolloutOptions(
        capture_routes=any(a.capture_routes for a in answers),
        decode_strategy=strategies[0] if strategies else None,
    )


def scalar_reward(sample: Sample, key: str | None) -> float:
    return sample.get_reward_value(key) if sample.reward is not None else 0.0


def staleness(sample: Sample, train_version: int) -> int:
    """How many weight versions the policy that trains on ``sample`` (``train_version``) is ahead of the
    oldest policy that sampled one of its tokens (0 when none is known)."""
    oldest = sample.oldest_weight_version
    return 0 if oldest is None else train_version - oldest


class RolloutManager:
    """Generates and scores the samples of each rollout."""

    def __init__(
        self,
        args: argparse.Namespace,
        pm: Any,
        engine: Any,
        tokenizer: Any,
        source: Any,
        eval_sets: dict[str, Any] | None = None,
    ) -> None:
        self.args, self.pm, self.engine, self.tokenizer = args, pm, engine, tokenizer
        self.source = source
        self.eval_sets = eval_sets or {}
        spec = args.custom_generate_function_path
        self.generate_fn = get_generate_fn(spec or "single_turn")
        self.generate_source = f"--custom-generate-function-path {spec}" if spec else "single_turn"
        self.failures = FailureLog()
        self.rewards = RewardRunner(args, self.failures)
        self.stopping = threading.Event()  # set when the run stops: in-flight requests are not resent
        self._run_id = uuid.uuid4().hex[:8]  # request ids are unique per run, also on a shared server
        self._data_states: dict[int, dict] = {}  # rollout id -> data position before its prompts
        self._data_lock = threading.Lock()
        self.sampler = DynamicSampler.from_args(args)  # None unless dynamic sampling is asked for
        spec = args.rollout_function_path
        self.rollout_fn = (
            load_function(spec, "generate_rollout", flag="--rollout-function-path") if spec else None
        )

    def _make_samples(self, prompts: list[Any], n: int) -> list[list[Sample]]:
        groups = []
        for g, p in enumerate(prompts):
            groups.append(
                [
                    Sample(
                        group_index=g,
                        index=g * n + i,
                        prompt=p.prompt_text,
                        tokens=list(p.prompt_ids),
                        label=p.label,
                        metadata=dict(p.metadata or {}),
                    )
                    for i in range(n)
                ]
            )
        return groups

    async def _one(self, sample: Sample, params: dict, bar: Any, key: str | None) -> list[Sample]:
        """Generate (one sample, or several: one per turn or branch, all in the prompt's group) and, without
        ``--group-rm``, reward each as soon as it is done."""
        sample.sampling_params = {k: params[k] for k in ("temperature", "top_p", "top_k")}
        prompt_tokens = list(sample.tokens)
        limit = self.args.rollout_max_context_len  # prompt + response; longer prompts were filtered out
        if limit is not None:
            params = dict(
                params, max_new_tokens=max(1, min(params["max_new_tokens"], limit - len(prompt_tokens)))
            )
        start_version = self.engine.weight_version
        outs = await self._generate(sample, params, prompt_tokens)
        for o in outs:
            o.group_index = sample.group_index
            if len(o.response_weight_versions) != o.response_length:
                # A generate function that bypassed generate_into: every token is counted as old as
                # the weights were when the sample started, the oldest they can be.
                o.response_weight_versions = [start_version] * o.response_length
        if not self.args.group_rm:
            await asyncio.gather(*(self.rewards.score(o, key) for o in outs))
        bar.update(1)
        return outs

    async def _generate(self, sample: Sample, params: dict, prompt_tokens: list[int]) -> list[Sample]:
        """The generate function's samples, each checked: a bad one is FAILED, its response blanked."""
        source = self.generate_source
        try:
            outs = checked_samples(await self.generate_fn(self.args, sample, dict(params)))
        except Exception as e:  # a failing generate function fails its sample, not the run
            err = e if isinstance(e, SampleError) else raised(e, "fix what makes it raise")
            blank_response(sample, prompt_tokens)
            self.failures.record([sample], "generate", source, err)
            return [sample]
        timed_out = current_context().timed_out
        for o in outs:
            problem = sample_problem(o)
            if id(o) in timed_out or o.status == Status.ABORTED:  # cut off: kept, never trained on
                o.status, o.reward = Status.ABORTED, 0.0
                if problem is not None:  # e.g. aborted before its first token
                    blank_response(o, prompt_tokens)
                continue
            if problem is not None:
                blank_response(o, prompt_tokens)
                self.failures.record([o], "generate", source, problem)
            elif o.status == Status.FAILED:  # the function's own verdict: counted, not logged
                blank_response(o, prompt_tokens)
                err = SampleError("marked it FAILED", fix="see its own output for why")
                self.failures.record([o], "generate", source, err, quiet=True)
        return outs

    async def _group(self, group: list[Sample], params: dict, bar: Any, key: str | None) -> list[Sample]:
        outs = await asyncio.gather(*(self._one(s, params, bar, key) for s in group))
        done = [o for sample_outs in outs for o in sample_outs]
        if self.args.group_rm:
            await self.rewards.score_group(done, key)
        return done

    async def _run(
        self, groups: list[list[Sample]], params: dict, desc: str, key: str | None, ctx: RolloutContext
    ) -> list[list[Sample]]:
        total = sum(len(g) for g in groups)
        with rollout_context(ctx), progress(total, desc) as bar:
            done = await asyncio.gather(*(self._group(g, params, bar, key) for g in groups))
        for i, s in enumerate(s for g in done for s in g):  # several samples per call shift the numbering
            s.index = i
        return done

    def _context(self, name: str, min_weight_version: int | None = None) -> RolloutContext:
        args = self.args
        return RolloutContext(
            engine=self.engine,
            tokenizer=self.tokenizer,
            pm=self.pm,
            timeout=args.rollout_timeout,
            partial_rollout=args.partial_rollout,
            min_weight_version=min_weight_version,
            stopping=self.stopping,
            rid_prefix=f"miles-{self._run_id}-{name}",
        )

    def generate(self, rollout_id: int) -> tuple[list[Sample], dict[str, float]]:
        """Run rollout ``rollout_id`` on a fresh event loop; see `agenerate`."""
        return asyncio.run(self.agenerate(rollout_id))

    def data_state(self, rollout_id: int) -> dict:
        """The data source's position before rollout ``rollout_id`` drew its prompts (what a checkpoint
        taken before training on it saves), also when a rollout thread has drawn them already."""
        with self._data_lock:
            self._data_states = {r: st for r, st in self._data_states.items() if r >= rollout_id}
            if rollout_id in self._data_states:
                return self._data_states[rollout_id]
            return self.source.state_dict()

    def _next_prompts(self, rollout_id: int) -> list[Any]:
        return self._draw(rollout_id, None, first=True)

    def _draw(self, rollout_id: int, n: int | None, first: bool) -> list[Any]:
        """The next ``n`` prompts (default ``--rollout-batch-size``); the data position before a
        rollout's ``first`` draw is what a checkpoint before it saves."""
        with self._data_lock:
            if first:
                self._data_states[rollout_id] = self.source.state_dict()
            return self.source.next_batch(n)

    async def agenerate(self, rollout_id: int) -> tuple[list[Sample], dict[str, float]]:
        """Run rollout ``rollout_id`` (the policy at weight version ``rollout_id`` trains on it); returns
        its samples (group-major) and metrics."""
        args = self.args
        self.engine.set_rollout_options(rollout_options(self.pm, args, rollout_id, self.engine))
        self.engine.reseed(args.rollout_seed + rollout_id)
        counts_before = self.failures.counts.copy()
        start = time.perf_counter()
        tokens_before = self.engine.generated_tokens
        # The policy version that trains on this rollout; under --debug-rollout-only nothing trains and the
        # engine keeps its first weights, so the samples are as fresh as those.
        version = self.engine.weight_version if args.debug_rollout_only else rollout_id
        ctx = self._context(f"r{rollout_id}", version - args.max_weight_staleness)
        sampled: dict[str, float] = {}
        if self.rollout_fn is not None:  # --rollout-function-path: the user's rollout; post_reward below
            groups, sampled = await self._custom_rollout(rollout_id, ctx)
        elif self.sampler is not None:  # rounds of over-sampling; post_reward runs on each round
            epoch = len(self.source.dataset)
            groups, sampled = await self.sampler.run(self, rollout_id, ctx, sampling_params(args), epoch)
        else:
            groups = await self._run(
                self._make_samples(self._next_prompts(rollout_id), args.n_samples_per_prompt),
                sampling_params(args),
                f"rollout {rollout_id}",
                args.reward_key,
                ctx,
            )
        elapsed = time.perf_counter() - start
        samples = [s for g in groups for s in g]
        self._drop_stale(samples, version)
        self.failures.check_some_succeeded(samples, counts_before, f"rollout {rollout_id}")
        if self.sampler is None:
            self.pm.hook.post_reward(args=args, samples=samples)
        metrics = {**self._metrics(samples, args.reward_key, "rollout"), **sampled}
        failed = self.failures.counts - counts_before
        for stage in ("reward", "generate"):
            metrics[f"rollout/{stage}_failed"] = float(sum(n for (st, _), n in failed.items() if st == stage))
        metrics["rollout/time_s"] = elapsed
        metrics["rollout/tok_per_s"] = (self.engine.generated_tokens - tokens_before) / max(elapsed, 1e-9)
        metrics.update(self._version_metrics(samples, version, ctx))
        for k, v in self.engine.metrics().items():
            metrics[f"rollout/{k}"] = float(v)
        for extra in self.pm.hook.rollout_metrics(args=args, rollout_id=rollout_id, samples=samples):
            metrics.update({f"rollout/{k}": float(v) for k, v in (extra or {}).items()})
        return samples, metrics

    async def _custom_rollout(self, rollout_id: int, ctx: RolloutContext) -> tuple[list[list[Sample]], dict]:
        """Groups and metrics of the ``--rollout-function-path`` function, checked and rewarded."""
        source = f"--rollout-function-path {self.args.rollout_function_path}"
        with rollout_context(ctx):
            data = RolloutDataSource(self, rollout_id, ctx, sampling_params(self.args))
            groups, metrics = await call_rollout_fn(self.rollout_fn, source, data)
            await finish_groups(self, groups, source)
        return groups, {f"rollout/{k}": v for k, v in metrics.items()}

    def _drop_stale(self, samples: list[Sample], rollout_id: int) -> None:
        """Fail (never train on) samples with a token older than ``--max-weight-staleness`` allows."""
        bound = self.args.max_weight_staleness
        stale = [s for s in samples if s.status not in EXCLUDED and staleness(s, rollout_id) > bound]
        for s in stale:
            err = SampleError(
                f"returned a sample with a token of weight version {s.oldest_weight_version}, more than "
                f"--max-weight-staleness {bound} behind the policy version {rollout_id} that trains on it",
                "returned a sample with a token older than --max-weight-staleness allows",
                "make it generate every token within the rollout it is given",
            )
            self.failures.record([s], "generate", self.generate_source, err)

    def _version_metrics(self, samples: list[Sample], rollout_id: int, ctx: RolloutContext) -> dict:
        """Staleness (policy version trained at minus a sample's oldest token version), its bound, and
        what became of requests aborted by weight updates or timeouts."""
        kept = [s for s in samples if s.status not in EXCLUDED]
        lags = [staleness(s, rollout_id) for s in kept] or [0]
        oldest = [v for s in kept if (v := s.oldest_weight_version) is not None]
        out = {
            "rollout/max_staleness": float(max(lags)),
            "rollout/mean_staleness": sum(lags) / len(lags),
            "rollout/oldest_weight_version": float(min(oldest, default=rollout_id)),
        }
        for name in ("continuations", "restarts", "stale_restarts", "timeouts"):
            out[f"rollout/{name}"] = float(ctx.stats[name])
        if ctx.stats["timeouts"]:
            log.warning(
                "rollout %d: %d requests outlived --rollout-timeout %g s and were aborted (their samples "
                "train on nothing); raise it if that is too many.",
                rollout_id,
                ctx.stats["timeouts"],
                self.args.rollout_timeout,
            )
        return out

    def evaluate(self, rollout_id: int) -> dict[str, float]:
        """Score every eval set on a fresh event loop; see `aevaluate`."""
        return asyncio.run(self.aevaluate(rollout_id))

    async def aevaluate(self, rollout_id: int) -> dict[str, float]:
        """Score every eval set (`miles_core.rollout.eval_sets.EvalSet`: its own samples per prompt,
        sampling parameters and reward); ``eval/<name>/accuracy`` is the fraction of rewards above 0.5,
        ``eval/<name>/pass@k`` the chance that one of k samples of a prompt is (k = 1, 2, 4, ...)."""
        args = self.args
        metrics: dict[str, float] = {}
        self.engine.reseed(args.rollout_seed + 10_000_019 + rollout_id)
        key = args.eval_reward_key or args.reward_key
        saved: list[Sample] = []
        for i, (name, eval_set) in enumerate(self.eval_sets.items()):
            params = dict(sampling_params(args, evaluation=True), **eval_set.sampling)
            samples = self._make_samples(list(eval_set.dataset), eval_set.n_samples)
            for s in (s for g in samples for s in g if eval_set.rm_type):
                s.metadata["rm_type"] = eval_set.rm_type
            ctx = self._context(f"eval{rollout_id}.{i}")
            groups = await self._run(samples, params, f"eval {name}", key, ctx)
            metrics.update(self._metrics([s for g in groups for s in g], key, f"eval/{name}"))
            counts = [
                (len(g), sum(s.status not in EXCLUDED and scalar_reward(s, key) > 0.5 for s in g))
                for g in groups
            ]
            metrics.update(pass_at_k_metrics(counts, f"eval/{name}"))
            saved += [s for g in groups for s in g]
        if args.save_debug_rollout_data:
            save_rollout(args.save_debug_rollout_data, rollout_id, saved, evaluation=True)
        return metrics

    def _metrics(self, samples: list[Sample], key: str | None, prefix: str) -> dict[str, float]:
        ok = [s for s in samples if s.status not in EXCLUDED]
        rewards = [scalar_reward(s, key) for s in ok]
        n = max(len(samples), 1)
        calls = [s.metadata["tool_calls"] for s in samples if "tool_calls" in s.metadata]  # tool_call's
        tools = {f"{prefix}/tool_calls_mean": sum(calls) / len(calls)} if calls else {}
        if calls:
            tools[f"{prefix}/tool_use_frac"] = sum(c > 0 for c in calls) / len(calls)
        return tools | {
            f"{prefix}/reward_mean": sum(rewards) / max(len(rewards), 1),
            f"{prefix}/accuracy": sum(r > 0.5 for r in rewards) / n,
            f"{prefix}/response_len_mean": sum(s.response_length for s in samples) / n,
            f"{prefix}/truncated_frac": sum(s.status == Status.TRUNCATED for s in samples) / n,
            f"{prefix}/failed_frac": sum(s.status == Status.FAILED for s in samples) / n,
            f"{prefix}/aborted_frac": sum(s.status == Status.ABORTED for s in samples) / n,
            f"{prefix}/num_samples": float(len(samples)),
        }
