"""Pairwise LLM judge over any OpenAI-compatible endpoint: early-exit answer vs the full model's answer.

Every pair is judged twice with the two answers in swapped positions (full first, then early exit first),
which cancels a judge's preference for the first or second slot. Per order the verdict is "A", "B" or
"tie" (anything else is "invalid"); the early-exit answer scores 1 for a win, 0.5 for a tie and 0 for a
loss, averaged over the valid orders. ``consistent`` says whether both orders named the same winner.

The client is plain HTTP (``urllib``) against ``{base_url}/chat/completions`` with ``temperature 0``; the
API key comes from the environment variable ``LITE_JUDGE_API_KEY`` (sent as a bearer token when set).
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass

from ..errors import LiteError

API_KEY_ENV = "LITE_JUDGE_API_KEY"

SYSTEM = (
    "You are an impartial judge of answers to user instructions. Compare two answers for helpfulness, "
    "correctness, relevance and detail. Do not let the order of the answers or their length influence you."
)
TEMPLATE = (
    "[Instruction]\n{instruction}\n\n[Answer A]\n{a}\n\n[Answer B]\n{b}\n\n"
    "Which answer is better? Reply with one line: 'Verdict: A', 'Verdict: B' or 'Verdict: tie'."
)
_VERDICT = re.compile(r"verdict\s*[:\-]?\s*\**\s*(a|b|tie)\b", re.IGNORECASE)


class JudgeError(LiteError):
    """The judge endpoint is unreachable or answered with something that is not a chat completion."""


@dataclass
class JudgeVerdict:
    """The judge's view of one prompt.

    Attributes:
        full_first: verdict with the full answer as A ("A", "B", "tie" or "invalid").
        early_first: verdict with the early-exit answer as A.
        score: early-exit score in [0, 1] (win 1, tie 0.5, loss 0) averaged over valid orders; None if none.
        consistent: both orders valid and naming the same winner (or both tie).
    """

    full_first: str
    early_first: str
    score: float | None
    consistent: bool


def parse_verdict(text: str) -> str:
    """"A", "B" or "tie" from a judge's reply, "invalid" when it names none (the last verdict line wins)."""
    found = _VERDICT.findall(text or "")
    if not found:
        stripped = (text or "").strip().strip(".*'\"").lower()
        return {"a": "A", "b": "B", "tie": "tie"}.get(stripped, "invalid")
    v = found[-1].lower()
    return "tie" if v == "tie" else v.upper()


class JudgeClient:
    """A minimal OpenAI-compatible chat client for judging.

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1`` (``/chat/completions`` is appended).
        model: the model name sent with each request.
        api_key: bearer token; default ``$LITE_JUDGE_API_KEY``.
        timeout: seconds per request.
        max_tokens: cap on the judge's reply.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 120.0,
                 max_tokens: int = 64) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise JudgeError(f"--judge-url {base_url!r}: give an http(s) URL such as http://127.0.0.1:8000/v1")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.timeout = timeout
        self.max_tokens = max_tokens

    def _request(self, method: str, path: str, body: dict | None = None,
                 timeout: float | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.base_url}{path}", data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:  # noqa: S310
                return json.loads(resp.read().decode())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            hint = f" (is ${API_KEY_ENV} set?)" if exc.code in (401, 403) else ""
            raise JudgeError(
                f"--judge-url {self.base_url}: {method} {path} answered HTTP {exc.code}: {detail}{hint}"
            ) from None
        except (urllib.error.URLError, OSError, json.JSONDecodeError) as exc:
            raise JudgeError(
                f"--judge-url {self.base_url} is unreachable or not an OpenAI-compatible API ({exc}); start "
                f"the server or fix the URL (it should end in /v1)"
            ) from None

    def check(self) -> None:
        """Fail fast before any work: one tiny chat completion must succeed."""
        self.chat("Reply with the word ok.", max_tokens=2, timeout=min(self.timeout, 30.0))

    def chat(self, user: str, system: str | None = None, max_tokens: int | None = None,
             timeout: float | None = None) -> str:
        """One chat completion at temperature 0; returns the reply text."""
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": user})
        body = {"model": self.model, "messages": messages, "temperature": 0.0,
                "max_tokens": max_tokens or self.max_tokens}
        out = self._request("POST", "/chat/completions", body, timeout)
        try:
            return str(out["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError):
            raise JudgeError(
                f"--judge-url {self.base_url}: the reply is not a chat completion: {str(out)[:200]}"
            ) from None

    def judge(self, instruction: str, full: str, early: str) -> JudgeVerdict:
        """Judge one pair in both orders (see the module docstring for the scoring)."""
        full_first = parse_verdict(self.chat(TEMPLATE.format(instruction=instruction, a=full, b=early),
                                             SYSTEM))
        early_first = parse_verdict(self.chat(TEMPLATE.format(instruction=instruction, a=early, b=full),
                                              SYSTEM))
        # translate each order's verdict into the early-exit answer's outcome
        outcome_1 = {"A": 0.0, "B": 1.0, "tie": 0.5}.get(full_first)
        outcome_2 = {"A": 1.0, "B": 0.0, "tie": 0.5}.get(early_first)
        valid = [o for o in (outcome_1, outcome_2) if o is not None]
        score = sum(valid) / len(valid) if valid else None
        return JudgeVerdict(full_first, early_first, score, outcome_1 is not None and outcome_1 == outcome_2)
