"""`miles rm-check`: the score table, the scored JSONL, dict / group / failing rewards, and bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from miles_core.cli import USAGE, main

MATCH = """
async def reward(args, sample):
    bonus = sample.metadata.get("bonus", 0.0)
    return (1.0 if sample.response.strip() == sample.label else 0.0) + bonus
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def jsonl(path: Path, rows: list, blank_after: int | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "")
    return write(path, "\n".join(lines) + "\n")


def error_of(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("miles: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.fixture
def rm(tmp_path) -> Path:
    return write(tmp_path / "reward.py", MATCH)


ROWS = [
    {"prompt": "1+1?", "response": " 2 ", "label": 2},  # a number label is compared as a string
    {"response": "3", "label": "2"},
    {"response": "7", "label": "7", "metadata": {"bonus": 0.5}, "id": "x"},
]


def test_table_summary_and_output(rm, tmp_path, capsys):
    data = jsonl(tmp_path / "d.jsonl", ROWS, blank_after=1)
    out = tmp_path / "out" / "scored.jsonl"
    assert main(["rm-check", "--custom-rm-path", str(rm), "--data", str(data), "--output", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["ROW", "SCORE", "LABEL", "RESPONSE", "(end)"]
    assert printed[1].split() == ["0", "1", "2", "2"]
    assert printed[2].split() == ["1", "0", "2", "3"]
    assert printed[3].split() == ["2", "1.5", "7", "7"]
    assert printed[4] == "mean score 0.8333 over 3 scored rows of 3 (0 failed)"
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert scored == [{**r, "score": s} for r, s in zip(ROWS, [1.0, 0.0, 1.5])]
    assert sorted(p.name for p in out.parent.iterdir()) == ["scored.jsonl"]  # no temp file left behind


def test_show_limits_the_table_and_excerpts_keep_the_end(rm, tmp_path, capsys):
    long = "x" * 100 + " the answer is 42"
    data = jsonl(tmp_path / "d.jsonl", [{"response": long, "label": "42"}] * 3)
    assert main(["rm-check", "--custom-rm-path", str(rm), "--data", str(data), "--show", "1"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 4 and printed[1].endswith("the answer is 42") and "..." in printed[1]
    assert "2 more rows" in printed[2]


def test_dict_reward_needs_reward_key(tmp_path, capsys):
    rm = write(
        tmp_path / "r.py", "async def reward(args, sample):\n    return {'score': -1.0, 'acc': False}\n"
    )
    data = jsonl(tmp_path / "d.jsonl", ROWS[:1])
    msg = error_of(capsys, ["rm-check", "--custom-rm-path", str(rm), "--data", str(data)])
    assert "--reward-key" in msg and "['acc', 'score']" in msg
    out = tmp_path / "o.jsonl"
    argv = ["rm-check", "--custom-rm-path", str(rm), "--data", str(data), "--reward-key", "score"]
    assert main(argv + ["--output", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["score"] == -1.0 and row["reward"] == {"score": -1.0, "acc": False}


def test_failing_and_hanging_rewards_are_reported(tmp_path, capsys):
    rm = write(
        tmp_path / "r.py",
        "import asyncio\n\nasync def reward(args, sample):\n"
        "    if sample.label == 'boom':\n        raise ValueError('bad label')\n"
        "    if sample.label == 'hang':\n        await asyncio.sleep(30)\n    return 1.0\n",
    )
    rows = [
        {"response": "a", "label": "ok"},
        {"response": "b", "label": "boom"},
        {"response": "c", "label": "hang"},
    ]
    data, out = jsonl(tmp_path / "d.jsonl", rows), tmp_path / "o.jsonl"
    argv = ["rm-check", "--custom-rm-path", str(rm), "--data", str(data), "--output", str(out)]
    assert main(argv + ["--rm-timeout", "0.3"]) == 1  # some row failed: a script can tell
    printed = capsys.readouterr().out
    assert "mean score 1.0000 over 1 scored rows of 3 (2 failed)" in printed
    assert "FAILED" in printed and "bad label" in printed and "timed out" in printed
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["score"] for r in scored] == [1.0, None, None]
    assert "ValueError: bad label" in scored[1]["reward_error"] and "timed out" in scored[2]["reward_error"]


def test_group_rm(tmp_path, capsys):
    rm = write(
        tmp_path / "g.py",
        "async def reward(args, samples):\n    return [float(len(s.response)) for s in samples]\n",
    )
    data = jsonl(tmp_path / "d.jsonl", [{"response": "a" * i, "label": ""} for i in range(1, 5)])
    out = tmp_path / "o.jsonl"
    argv = ["rm-check", "--custom-rm-path", str(rm), "--data", str(data), "--group-rm"]
    assert main(argv + ["--n-samples-per-prompt", "2", "--output", str(out)]) == 0
    assert [json.loads(x)["score"] for x in out.read_text().splitlines()] == [1.0, 2.0, 3.0, 4.0]
    msg = error_of(capsys, argv + ["--n-samples-per-prompt", "3"])
    assert "multiple of 3" in msg


def test_config_file_gives_the_flags(rm, tmp_path, capsys):
    data = jsonl(tmp_path / "d.jsonl", [{"answer": "5", "text": "5"}])
    cfg = write(
        tmp_path / "c.yaml", f"custom-rm-path: {rm}\nlabel-key: answer\nresponse-key: text\ndata: {data}\n"
    )
    assert main(["rm-check", "--config", str(cfg)]) == 0
    assert "mean score 1.0000 over 1" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "where", "words"),
    [
        ('{"response": "a", "label": "1"}\n{"response": "b", "label": \n', 2, ["malformed JSON"]),
        (
            '{"response": "a", "label": "1"}\n\n{"answer": "b", "label": "1"}\n',
            3,
            ["'response'", "--response-key"],
        ),
        ('{"response": "a"}\n', 1, ["'label'", "--label-key"]),
        ('{"response": 5, "label": "5"}\n', 1, ["not a string"]),
        ('{"response": "a", "label": "1", "metadata": [1]}\n', 1, ["'metadata'", "object"]),
        ("[1, 2]\n", 1, ["not an object"]),
    ],
)
def test_bad_row_names_file_and_line(rm, tmp_path, capsys, text, where, words):
    data = write(tmp_path / "bad.jsonl", text)
    msg = error_of(capsys, ["rm-check", "--custom-rm-path", str(rm), "--data", str(data)])
    assert f"{data}:{where}:" in msg
    for word in words:
        assert word in msg


def test_usage_errors(rm, tmp_path, capsys):
    data = jsonl(tmp_path / "d.jsonl", ROWS)
    assert "--data" in error_of(capsys, ["rm-check", "--custom-rm-path", str(rm)])
    assert "--rm-type" in error_of(capsys, ["rm-check", "--data", str(data)])
    both = ["rm-check", "--rm-type", "x", "--custom-rm-path", str(rm), "--data", str(data)]
    assert "not both" in error_of(capsys, both)
    msg = error_of(capsys, ["rm-check", "--custom-rm-path", str(rm), "--data", str(tmp_path / "none.jsonl")])
    assert "none.jsonl does not exist" in msg
    empty = write(tmp_path / "e.jsonl", "\n\n")
    assert "has no rows" in error_of(capsys, ["rm-check", "--custom-rm-path", str(rm), "--data", str(empty)])
    msg = error_of(capsys, ["rm-check", "--custom-rm-path", str(rm), "--data", str(data), "--outptu", "x"])
    assert "--outptu" in msg and "--output" in msg
    assert "rm-check" in USAGE
