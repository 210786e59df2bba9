"""An LLM judge over any OpenAI-compatible endpoint, scoring each dialogue answer from 1 to 10.

The judge is named in the configuration (``evaluate.judge: {url, model, api_key_env}``): ``url`` is the
API base (``http://host:port/v1``), ``model`` the judge model's name there, ``api_key_env`` the name of the
environment variable holding the key. The key itself is read from the environment when a request is
sent; it is never stored with a run, written to a log or put in an error message.

Each answer is scored in MT-Bench's single-answer style: the judge sees the conversation so far and the
answer, and must end with ``Rating: [[N]]``. A reply without a rating scores nothing and is counted
(``dialogue.judge.unrated``). The endpoint is asked ``GET {url}/models`` before any model work, so a URL
that does not answer fails within ``timeout_s`` seconds.
"""

from __future__ import annotations

import json
import logging
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .dialogue import Conversation

log = logging.getLogger(__name__)

RATING = re.compile(r"\[\[(\d+(?:\.\d+)?)\]\]")
SYSTEM = ("You are a fair judge of an AI assistant's answers. Rate the helpfulness, correctness and clarity of "
          "the assistant's last answer on a scale of 1 to 10. Explain briefly, then end with the rating in "
          "exactly this form: Rating: [[N]]")


@dataclass(frozen=True)
class Judge:
    """Where the judge is: API base URL, model name, the key's environment variable, the request timeout."""

    url: str
    model: str
    api_key_env: str | None = None
    timeout_s: float = 30.0

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise ConfigError(f"evaluate.judge.api_key_env: the environment variable {self.api_key_env} is "
                                  "not set")
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _request(self, path: str, body: dict[str, Any] | None, timeout: float) -> Any:
        url = self.url.rstrip("/") + path
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, headers=self._headers(), method="GET" if body is None else "POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - the user's own endpoint
                return json.loads(resp.read().decode())
        except urllib.error.HTTPError as exc:
            raise ConfigError(f"evaluate.judge: {url} answered HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ConfigError(f"evaluate.judge: {url} does not answer ({reason})") from None
        except json.JSONDecodeError:
            raise ConfigError(f"evaluate.judge: {url} did not answer with JSON") from None

    def check(self) -> None:
        """Ask the endpoint for its models, within a few seconds (ConfigError when it does not answer)."""
        self._headers()
        self._request("/models", None, min(self.timeout_s, 5.0))

    def score(self, conversation: Conversation, turn: int) -> tuple[float | None, str]:
        """The judge's rating of answer ``turn`` of ``conversation`` (None when it gave none) and its reply."""
        transcript = []
        for i in range(turn + 1):
            transcript.append(f"User: {conversation.turns[i]}")
            transcript.append(f"Assistant: {conversation.answers[i]}")
        body = {"model": self.model, "temperature": 0,
                "messages": [{"role": "system", "content": SYSTEM},
                             {"role": "user", "content": "\n".join(transcript)}]}
        reply = self._request("/chat/completions", body, self.timeout_s)
        try:
            text = str(reply["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError):
            raise ConfigError(f"evaluate.judge: {self.url} did not answer in the chat completions format") from None
        found = RATING.findall(text)
        return (min(10.0, max(1.0, float(found[-1]))) if found else None), text


def judge_conversations(judge: Judge, conversations: list[Conversation]) -> tuple[list[list[float | None]], int]:
    """Scores of every answer (per conversation, per turn) and how many replies had no rating."""
    scores: list[list[float | None]] = []
    unrated = 0
    for conv in conversations:
        row: list[float | None] = []
        for turn in range(len(conv.answers)):
            value, _ = judge.score(conv, turn)
            unrated += value is None
            row.append(value)
        scores.append(row)
    log.info("judge %s scored %d answers (%d without a rating)", judge.model, sum(map(len, scores)), unrated)
    return scores, unrated


def judge_of(config: Any) -> Judge:
    """The judge of an ``evaluate`` section (which must have one)."""
    j = config.judge
    return Judge(j.url, j.model, j.api_key_env, j.timeout_s)
