"""On-policy distillation (miles_core.train.distill): the advantage arithmetic by hand, and training on the
student's own samples with a teacher checkpoint moves the student's log-probs toward the teacher's."""

from __future__ import annotations

import copy
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from approx import close, t
from conftest import DEMO_CKPT, tiny_config
from serve_helpers import served
from test_trainer import make_args, rollout

from miles_core.loop import make_train_batch
from miles_core.model import ModelConfig, build_model, load_model, save_model
from miles_core.plugins import get_plugin_manager
from miles_core.train.distill import opd_advantages, server_teacher_log_probs, teacher_log_probs
from miles_core.train.trainer import Trainer
from miles_core.types import UsageError


def test_opd_advantages_by_hand():
    # reverse KL = student - teacher = [0.5, -1 | 0]; adv - 2 * that = [0 - 1, 0 + 2 | 1 - 0]
    advs, m = opd_advantages(
        [t(0, 0), t(1)], [t(-1, -2), t(-0.5)], [t(-1.5, -1), t(-0.5)], [t(1, 1), t(1)], coef=2.0
    )
    close(advs[0], [-1.0, 2.0])
    close(advs[1], [1.0])
    assert m["opd_reverse_kl"] == pytest.approx(((0.5 - 1) / 2 + 0) / 2)
    # the masked token's difference does not count in the metric
    _, m = opd_advantages([t(0, 0)], [t(-1, -2)], [t(-1.5, -9)], [t(1, 0)], coef=1.0)
    assert m["opd_reverse_kl"] == pytest.approx(0.5)


def gap(student, teacher, batch) -> float:
    """Mean over samples of the masked mean |log p_student - log p_teacher| of the sampled tokens."""
    total = 0.0
    for s_lp, t_lp, m in zip(student, teacher, batch.loss_masks):
        total += float(((s_lp - t_lp).abs() * m).sum() / m.sum().clamp(min=1))
    return total / len(batch)


def test_distillation_moves_the_student_toward_the_teacher(tiny_ckpt, tiny_ckpt_b):
    """Zero task rewards, so GRPO's advantages are 0 and only OPD's (log p_teacher - log p_student) per
    token trains: after 6 steps on the student's own samples, the student's log-probs of those tokens are
    closer to the teacher's (measured: mean |gap| 1.06 -> 0.17 nats; with the sign flipped it grows to
    2.5), and opd_reverse_kl shrinks."""
    args = make_args(
        tiny_ckpt,
        ["--use-opd", "--opd-type", "megatron", "--opd-teacher-load", str(tiny_ckpt_b),
         "--opd-kl-coef", "1.0", "--micro-batch-size", "8", "--lr", "3e-3"],
    )  # fmt: skip
    samples = rollout(tiny_ckpt, args)
    for s in samples:
        s.reward = 0.0
    trainer = Trainer(args, get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""}), load_model(tiny_ckpt))
    probe = make_train_batch(copy.deepcopy(samples), args)
    teacher = teacher_log_probs(trainer, probe)
    before = gap(trainer.compute_log_probs(probe, "old"), teacher, probe)
    kls = []
    for i in range(6):
        kls.append(trainer.train(i, make_train_batch(copy.deepcopy(samples), args))[0]["opd_reverse_kl"])
    after = gap(trainer.compute_log_probs(probe, "old"), teacher, probe)
    assert after < 0.8 * before, (before, after)
    assert kls[-1] < kls[0], kls
    assert kls[0] > 0  # the student's own samples: KL(student || teacher) estimate is positive


def test_teacher_with_another_vocabulary_is_refused(tiny_ckpt, tmp_path):
    other = tmp_path / "other"
    save_model(build_model(ModelConfig.from_hf(tiny_config(64, 3))), other, tokenizer_src=str(DEMO_CKPT))
    args = make_args(tiny_ckpt, ["--use-opd", "--opd-type", "megatron", "--opd-teacher-load", str(other)])
    with pytest.raises(UsageError, match="vocabulary"):
        Trainer(args, get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""}), load_model(tiny_ckpt))


class _TeacherHandler(BaseHTTPRequestHandler):
    """SGLang's /generate answer to slime's OPD request: input_token_logprobs of the prompt (first None)."""

    model = None

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert body["sampling_params"]["max_new_tokens"] == 0 and body["return_logprob"]
        ids = torch.tensor(body["input_ids"])
        with torch.no_grad():
            logits = self.model(ids[:-1][None]).logits[0].float() / body["sampling_params"]["temperature"]
            lps = torch.log_softmax(logits, -1).gather(-1, ids[1:, None])[:, 0].tolist()
        pairs = [[None, int(ids[0]), None]] + [[lp, int(t), None] for lp, t in zip(lps, ids[1:].tolist())]
        out = json.dumps({"text": "", "meta_info": {"input_token_logprobs": pairs}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *a):
        pass


@pytest.fixture
def teacher_url(tiny_ckpt_b):
    handler = type("H", (_TeacherHandler,), {"model": load_model(tiny_ckpt_b).eval()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/generate"
    server.shutdown()


def test_server_teacher_gives_the_checkpoint_teachers_log_probs_and_step(tiny_ckpt, tiny_ckpt_b, teacher_url):
    """--opd-type sglang against an SGLang-style server running the same teacher weights: the teacher
    log-probs and the OPD step's gradient equal those of --opd-type megatron with that checkpoint."""
    common = ["--use-opd", "--opd-kl-coef", "1.0", "--micro-batch-size", "8", "--clip-grad", "0"]
    ckpt_args = make_args(
        tiny_ckpt, [*common, "--opd-type", "megatron", "--opd-teacher-load", str(tiny_ckpt_b)]
    )
    url_args = make_args(tiny_ckpt, [*common, "--opd-type", "sglang", "--opd-teacher-urls", teacher_url])
    assert url_args.opd_teacher_urls == {"default": teacher_url}
    samples = rollout(tiny_ckpt, ckpt_args)
    for s in samples:
        s.reward = 0.0
    pm = get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""})
    grads = []
    for args in (ckpt_args, url_args):
        trainer = Trainer(args, pm, load_model(tiny_ckpt))
        trainer.train(0, make_train_batch(copy.deepcopy(samples), args))
        grads.append(torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-4)
    # routing by metadata: a sample naming no known teacher, with no default, is refused in one sentence
    named = make_args(
        tiny_ckpt, [*common, "--opd-type", "sglang", "--opd-teacher-urls", f"math={teacher_url}"]
    )
    batch = make_train_batch(copy.deepcopy(samples), named)
    with pytest.raises(UsageError, match="no default"):
        server_teacher_log_probs(named, batch)
    for s in batch.samples:
        s.metadata["opd_teacher"] = "math"
    assert len(server_teacher_log_probs(named, batch)) == len(batch)


def test_miles_serve_scores_prompts_as_an_opd_teacher(tiny_ckpt, tiny_ckpt_b, tmp_path):
    """`miles serve` answers slime's teacher request (max_new_tokens 0, logprob_start_len): the teacher
    log-probs it returns equal the checkpoint teacher's, and logprob_start_len drops the leading ones."""
    args = make_args(
        tiny_ckpt, ["--use-opd", "--opd-type", "megatron", "--opd-teacher-load", str(tiny_ckpt_b)]
    )
    samples = rollout(tiny_ckpt, args)
    trainer = Trainer(args, get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""}), load_model(tiny_ckpt))
    batch = make_train_batch(copy.deepcopy(samples), args)
    want = teacher_log_probs(trainer, batch)
    with served(tiny_ckpt_b, tmp_path / "serve") as s:
        url_args = make_args(
            tiny_ckpt, ["--use-opd", "--opd-type", "sglang", "--opd-teacher-urls", s.url + "/generate"]
        )
        got = server_teacher_log_probs(url_args, batch)
        ids = list(samples[0].tokens)
        code, body = s.post("/generate", {"input_ids": ids, "sampling_params": {"max_new_tokens": 0},
                                          "return_logprob": True, "logprob_start_len": 2})  # fmt: skip
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert code == 200 and body["meta_info"]["completion_tokens"] == 0
    pairs = body["meta_info"]["input_token_logprobs"]
    assert len(pairs) == len(ids) - 2 and [p[1] for p in pairs] == ids[2:] and pairs[0][0] is not None
