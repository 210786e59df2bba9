"""Dialogue and its judge, end to end on stories260K, against a real local HTTP server (a real socket)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch

from ptqlab.compile import compile_config
from ptqlab.errors import ConfigError, DataError
from ptqlab.eval.dialogue import BUILTIN, load_conversations, run_dialogue
from ptqlab.models.loading import load_model
from ptqlab.store import Store
from ptqlab.study.config import parse_config
from ptqlab.study.worker import Worker

KEY = "sk-test-do-not-store-7f3a"


class _Judge(BaseHTTPRequestHandler):
    """An OpenAI-compatible judge: rates an answer 7, or 3 when the answer is empty; checks the key."""

    seen: list[dict[str, Any]] = []

    def log_message(self, *args: Any) -> None:  # keep the test output clean
        return

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            self._send(401, {"error": "bad key"})
            return
        self._send(200, {"data": [{"id": "judge-1"}]})

    def do_POST(self) -> None:  # noqa: N802 - the http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Judge.seen.append(body)
        last = body["messages"][-1]["content"].rsplit("Assistant:", 1)[-1].strip()
        self._send(200, {"choices": [{"message": {"role": "assistant",
                                                  "content": f"Fine. Rating: [[{3 if not last else 7}]]"}}]})


@pytest.fixture
def judge_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("PTQLAB_JUDGE_KEY", KEY)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Judge.seen.clear()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def _config(evaluate: dict[str, Any]) -> dict[str, Any]:
    return {"model": "stories260k", "scheme": {"weight": {"bits": 4}}, "recipe": [{"rtn": {}}], "evaluate": evaluate}


# A chat template for the test (stories260K's tokenizer has none), and the same rendering written out by hand.
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _by_hand(template: str | None, history: list[tuple[str, str]], turn: str) -> str:
    """The prompt of ``turn`` after the (user, answer) pairs of ``history``, rendered as each branch must."""
    if template is None:  # no chat template: a plain transcript
        lines = [line for user, answer in history for line in (f"User: {user}", f"Assistant: {answer}")]
        return "\n".join([*lines, f"User: {turn}"]) + "\nAssistant:"
    done = "".join(f"<|user|>{user}\n<|assistant|>{answer}\n" for user, answer in history)
    return f"{done}<|user|>{turn}\n<|assistant|>"


@pytest.mark.parametrize("template", [None, TEMPLATE], ids=["plain", "chat_template"])
def test_multi_turn_answers_follow_the_conversation(template: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each turn's prompt is the conversation so far (the earlier answers included) rendered with the chat
    template and the generation prompt, and each answer is the greedy decode of that prompt by the model itself."""
    lm = load_model("stories260k", "float32", "cpu")
    model, tok = lm.model, lm.tokenizer
    monkeypatch.setattr(tok, "chat_template", template)
    prompts: list[list[int]] = []
    generate = model.generate

    def recorded(ids: torch.Tensor, **kwargs: Any) -> Any:
        prompts.append(ids[0].tolist())
        return generate(ids, **kwargs)

    monkeypatch.setattr(model, "generate", recorded)
    convs = run_dialogue(model, tok, load_conversations(None, 2), max_new_tokens=6)
    assert [(c.question_id, c.turns) for c in convs] == [(b["question_id"], b["turns"]) for b in BUILTIN[:2]]
    assert [len(c.answers) for c in convs] == [2, 2] and len(prompts) == 4
    assert any(a for c in convs for a in c.answers)  # stories260K says something: the checks below are not vacuous
    asked = iter(prompts)
    for conv in convs:
        for k, (turn, answer) in enumerate(zip(conv.turns, conv.answers, strict=True)):
            text = _by_hand(template, list(zip(conv.turns[:k], conv.answers[:k], strict=True)), turn)
            ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
            assert next(asked) == ids[0].tolist(), text
            with torch.inference_mode():
                out = generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                               pad_token_id=tok.eos_token_id)
            assert answer == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip(), text
    again = run_dialogue(model, tok, load_conversations(None, 2), max_new_tokens=6)
    assert [c.answers for c in again] == [c.answers for c in convs]  # greedy: the same answers


def test_the_judge_scores_every_answer_and_no_key_is_stored(tmp_path: Path, judge_url: str,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("PTQLAB_CACHE", str(tmp_path / "cache"))
    caplog.set_level("DEBUG")
    evaluate = {"dialogue": {"limit": 2, "max_new_tokens": 6},
                "judge": {"url": judge_url, "model": "judge-1", "api_key_env": "PTQLAB_JUDGE_KEY"}}
    record = Worker(progress=False).run(parse_config(_config(evaluate)))
    assert record.status == "done", record.error
    metrics = {m.name: m.value for m in record.metrics}
    transcripts = json.loads(record.texts["dialogue"])
    answers = [a for t in transcripts for a in t["answers"]]
    expected = [3.0 if not a else 7.0 for a in answers]
    assert metrics["dialogue.answers"] == 4 and len(_Judge.seen) == 4
    assert metrics["dialogue.judge.score"] == pytest.approx(sum(expected) / len(expected))
    assert metrics["dialogue.judge.unrated"] == 0
    assert json.loads(record.texts["dialogue.judge"])["scores"] == [expected[:2], expected[2:]]
    assert _Judge.seen[1]["messages"][-1]["content"].count("User:") == 2  # the second turn sees the first
    db = tmp_path / "runs.db"
    Store(db).save(record)
    assert KEY.encode() not in db.read_bytes()
    assert not [r for r in caplog.records if KEY in r.getMessage()]


def test_a_judge_that_does_not_answer_fails_within_seconds() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="does not answer"):
        compile_config(parse_config(_config({"dialogue": {}, "judge": {"url": f"http://127.0.0.1:{port}/v1",
                                                                      "model": "x"}})))
    assert time.perf_counter() - t0 < 10


def test_bad_dialogue_input_is_refused(tmp_path: Path, judge_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="add evaluate.dialogue"):
        parse_config(_config({"perplexity": ["wikitext2"], "judge": {"url": judge_url, "model": "x"}}))
    with pytest.raises(ConfigError, match="does not exist"):
        compile_config(parse_config(_config({"dialogue": {"path": str(tmp_path / "none.jsonl")}})))
    monkeypatch.setenv("PTQLAB_JUDGE_KEY", "wrong")
    with pytest.raises(ConfigError, match="HTTP 401"):
        compile_config(parse_config(_config({"dialogue": {}, "judge": {"url": judge_url, "model": "x",
                                                                      "api_key_env": "PTQLAB_JUDGE_KEY"}})))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "turns": "not a list"}\n')
    with pytest.raises(DataError, match="no list of user turns"):
        load_conversations(str(bad), None)
