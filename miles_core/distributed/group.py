"""The trainer ranks seen as one train backend, and the weight path from them to the engines.

`TrainGroup` is what the loop gets as ``trainer`` in a scaled-out run: every call goes to all rank actors
(`rank.TrainRank`) in the same order — submitted under one lock, so calls from the loop's thread and from
the engine watcher's thread (catching up a restarted engine) never interleave differently on two ranks —
and waits for all of them. A rank that dies ends the run with one sentence naming the rank and the
command that resumes it.

`RankUpdater` stands in for the HTTP client's `WeightUpdater`: ``HttpEngine.update_weights`` pauses the
engines and calls ``push`` (``send`` to catch up an engine), and the ranks move the weights themselves.
Colocated, it also takes turns with the engines: before training they release their memory (weights to
host, KV cache freed) and the ranks load their optimizer state back; before the weights are handed over
the engines take their memory back, and afterwards the ranks offload again.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import torch

from miles_core.errors import UsageError
from miles_core.logging import get_logger
from miles_core.serve.remote import post_json
from miles_core.types import TrainBatch

log = get_logger(__name__)


def resume_command(args: argparse.Namespace) -> str:
    """The command line that resumes this run from its last checkpoint (``--load`` set to ``--save``)."""
    argv = list(sys.argv[1:])
    if not argv or argv[0] != "train":
        argv.insert(0, "train")
    if "--load" in argv:
        i = argv.index("--load")
        del argv[i : i + 2]
    return shlex.join(["miles", *argv, "--load", str(args.save)])


DEATH_GRACE_S = 10.0  # how long a rank's error waits for the others to say whether one of them died


class RankDied(UsageError):
    """A trainer rank's process died; the message names it and how to resume."""


class TrainGroup:
    """The `TrainBackend` of ``--actor-num-nodes x --actor-num-gpus-per-node`` FSDP2 trainer ranks.

    :param ranks: the rank actors (`TrainRank` handles), rank i at index i, already set up.
    :param colocated: whether they share their devices with the engines (and take turns with them).
    """

    def __init__(self, args: argparse.Namespace, ranks: list[Any], *, colocated: bool) -> None:
        self.args, self.ranks, self.colocated = args, ranks, colocated
        self.engine: Any = None  # the HttpEngine whose engines this group updates (set by `attach`)
        self._submit = threading.Lock()
        self.timings: dict[str, float] = {}  # seconds of the last hand-over, offload, engine resume
        self._placement: Any = None
        self._stop_ray = False

    def on_close(self, placement: Any, stop_ray: bool) -> None:
        """Also remove ``placement`` and (if this run started it) stop Ray when the group closes."""
        self._placement, self._stop_ray = placement, stop_ray

    # ---------------------------------------------------------------- calling every rank

    def call(self, method: str, *args: Any, ranks: list[int] | None = None) -> list[Any]:
        """``method(*args)`` on every rank (or those of ``ranks``), in one order; their answers."""
        which = range(len(self.ranks)) if ranks is None else ranks
        with self._submit:
            refs = [getattr(self.ranks[i], method).remote(*args) for i in which]
        return self.wait(refs, list(which))

    def call_each(
        self, method: str, per_rank: list[tuple], meanwhile: Callable[[], None] | None = None
    ) -> list[Any]:
        """``method(*per_rank[i])`` on rank i, every rank in one order; ``meanwhile()`` runs here while
        the ranks work."""
        with self._submit:
            refs = [getattr(r, method).remote(*a) for r, a in zip(self.ranks, per_rank)]
        if meanwhile is not None:
            meanwhile()
        return self.wait(refs, list(range(len(self.ranks))))

    def wait(self, refs: list[Any], which: list[int]) -> list[Any]:
        """The answers of ``refs``. A rank that died ends the run at once, naming the rank: the others
        may be blocked in a collective with it, so they are killed, not waited for. An error raised in a
        rank is raised here (the ranks are killed too when the call went to several), unless a rank died:
        the others' collectives then fail first ("connection reset by peer"), so before their error is
        raised the rest get `DEATH_GRACE_S` to say whether one of them died."""
        import ray

        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(done[0])
            except ray.exceptions.RayActorError as e:
                self._rank_died(which[refs.index(done[0])], e)
            except ray.exceptions.RayTaskError as e:
                if len(refs) > 1:  # the others may wait in a collective for this one forever
                    ready, _ = ray.wait(pending, num_returns=len(pending), timeout=DEATH_GRACE_S)
                    for ref in ready:
                        try:
                            ray.get(ref)
                        except ray.exceptions.RayActorError as dead:
                            self._rank_died(which[refs.index(ref)], dead)
                        except ray.exceptions.RayTaskError:
                            pass
                    self.kill()
                if isinstance(e.cause, UsageError):  # its one sentence, without Ray's traceback
                    raise UsageError(str(e.cause)) from None
                raise e.as_instanceof_cause() from None
        return ray.get(refs)

    def _rank_died(self, rank: int, e: BaseException) -> NoReturn:
        self.kill()
        how = (
            f"resume from its last checkpoint with: {resume_command(self.args)}"
            if self.args.save
            else "pass --save DIR to make runs resumable"
        )
        raise RankDied(f"trainer rank {rank} died ({_first_line(e)}); {how}.") from None

    def kill(self) -> None:
        import ray

        for r in self.ranks:
            try:
                ray.kill(r, no_restart=True)
            except Exception:  # already gone
                pass

    # ---------------------------------------------------------------- TrainBackend

    def train(self, rollout_id: int, batch: TrainBatch) -> list[dict[str, float]]:
        """Every rank gets the whole batch (one copy in Ray's object store) and trains on its share."""
        import ray

        timings = dict(self.timings)
        if self.colocated:
            t0 = time.perf_counter()
            self.engine.release_memory()  # the engines make room: weights to host, KV cache freed
            timings["engine_release_s"] = time.perf_counter() - t0
            timings["onload_s"] = max(self.call("onload"))
        ref = ray.put(batch)
        steps = self.call("train", rollout_id, ref)[0]
        for s in steps:  # the colocated turn-taking costs (the hand-over and offload: the last update's)
            s.update(timings)
        return steps

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The full weights gathered to this process (lazily: the engines' own update path moves them
        without it, see `RankUpdater`)."""
        yield from self.call("full_weights")[0]

    def save_model(self, path: str, tokenizer_src: str | None) -> None:
        self.call("save_model", str(path), tokenizer_src)

    def save_state(self, folder: Path) -> None:
        """The sharded optimizer state and step count under ``folder`` (every rank writes its shard)."""
        self.call("save_state", str(folder))

    def state_dict(self) -> dict[str, Any]:
        raise UsageError("the trainer ranks save their state sharded (save_state), not as one dict.")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        folder = state.get("sharded")
        if folder is None:
            raise UsageError(
                "this checkpoint was written by the single-process trainer (trainer.pt), which the trainer "
                "ranks of --use-ray cannot resume; resume it without --use-ray, or start a new run from its "
                "model/ folder with --hf-checkpoint."
            )
        self.call("load_state", folder)

    def close(self) -> None:
        try:
            self.call("close")
        except Exception as e:  # a rank that is gone has nothing to close
            log.warning("closing the trainer ranks: %s", e)
        self.kill()
        if self._placement is not None:
            self._placement.remove()
            self._placement = None
        if self._stop_ray:
            from miles_core.distributed.placement import stop_ray

            stop_ray()
            self._stop_ray = False

    # ---------------------------------------------------------------- engines

    def attach(self, engine: Any) -> None:
        self.engine = engine


class RankUpdater:
    """``HttpEngine``'s updater in a scaled-out run: the trainer ranks send the weights (see module)."""

    def __init__(
        self,
        group: TrainGroup,
        *,
        mode: str,
        start_weights: str,
        folder: Path,
        host_rank: Any = None,
    ) -> None:
        self.group, self.mode = group, mode
        self.start_weights, self.folder = str(Path(start_weights).resolve()), Path(folder).resolve()
        self.host_rank = host_rank  # colocated: url -> the rank sharing its device
        self.version = 0
        self._updated = False  # until the first update the engines serve what they started from

    def push(self, urls: list[str], named: Any, version: int) -> None:
        """Take ``version`` as the current weights and load them into the engines ``urls``. ``named`` (the
        trainer's ``named_weights``, a lazy generator) is left alone: disaggregated, the ranks gather and
        rank 0 sends each bucket as it comes (over NCCL from its GPU, see `WeightUpdater.push`) and keeps
        them; colocated, they are gathered again for each send."""
        del named
        self.version, self._updated = version, True
        if self.group.colocated:
            self.send(urls)
            return
        args = (version, self.mode, self.start_weights, str(self.folder), list(urls))
        failed = self.group.call("push_weights", *args)[0]
        if failed is not None:  # the caller sends what rank 0 kept to the engines that are left
            raise RuntimeError(f"trainer rank 0 could not send the weights to the engines: {failed}")

    def relabel(self, version: int) -> None:
        self.version = version

    def send(self, urls: list[str]) -> None:
        if not urls:
            return
        if not self._updated:  # the engines started from the start weights: they need only the label
            if self.version != 0:  # a resumed run's
                body = {"model_path": self.start_weights, "weight_version": str(self.version)}
                for u in urls:
                    post_json(u + "/update_weights_from_disk", body)
            return
        if self.group.colocated:
            self._hand_over(urls)
        else:
            self.group.call("send_weights", urls, self.version, ranks=[0])

    def _hand_over(self, urls: list[str]) -> None:
        group = self.group
        by_rank: dict[int, str] = {}
        for u in urls:
            by_rank[self.host_rank(u)] = u

        def resume() -> None:  # the ranks start offloading and gathering meanwhile; an update that
            t0 = time.perf_counter()  # reaches an engine first takes the memory back itself
            group.engine.resume_memory(urls)
            group.timings["engine_resume_s"] = time.perf_counter() - t0

        per_rank = [(by_rank.get(i), self.version) for i in range(len(group.ranks))]
        group.timings["hand_over_s"] = max(group.call_each("hand_over", per_rank, meanwhile=resume))
        group.timings["offload_s"] = max(group.call("offload"))

    def close(self) -> None:
        """Nothing to release here: rank 0 leaves its weight group when the ranks close."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
