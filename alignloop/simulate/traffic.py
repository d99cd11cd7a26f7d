"""Simulated traffic: chat requests to the gateway, then one piece of feedback per response, as an application
would send them (HTTP with an application key, nothing else).

Each request i asks for `n` answers to a prompt (the prompts are cycled in an order fixed by the seed), then
sends one feedback item on them, its kind drawn from the mix:
- thumbs / rating: on one of the answers, chosen at random;
- comparison: two of the answers (needs n >= 2), `preferred` by the labeler;
- ranking: all n answers (needs n >= 2), best first by the labeler.

Everything random about request i (prompt order aside) comes from generators seeded by (seed, i), so a run
does not depend on how threads interleave. Each feedback item carries a `feedback_id` derived from its
completion ids, so a retried feedback request is replayed by the gateway, never stored twice.

Requests are retried (bounded, exponential backoff) on 429, 502, 503, 504 and connection errors. A 401, 403 or
404 on a chat request stops the run, as does a gateway that could not be reached before any answer came:
every other request would end the same way.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from alignloop.simulate import prompts as prompt_sets
from alignloop.simulate.labeler import Answer, Components, Labeler, components

KINDS = ("thumbs", "rating", "comparison", "ranking")
PAIRED = ("comparison", "ranking")  # kinds that need two answers or more
DEFAULT_MIX = {kind: 0.25 for kind in KINDS}
RETRY_STATUSES = frozenset({429, 502, 503, 504})
FATAL_STATUSES = frozenset({401, 403, 404})
MAX_ERRORS_KEPT = 5


def parse_mix(text: str) -> dict[str, float]:
    """"thumbs=0.5,ranking=0.5" → a weight per kind of KINDS (absent kinds 0), summing to 1.

    ValueError for an unknown or repeated kind, a weight that is not a finite number >= 0, or all zeros."""
    weights: dict[str, float] = {}
    for part in text.split(","):
        kind, sep, value = (s.strip() for s in part.partition("="))
        if not sep or not kind:
            raise ValueError(f"{part.strip()!r} is not KIND=WEIGHT")
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r} (kinds: {', '.join(KINDS)})")
        if kind in weights:
            raise ValueError(f"{kind} given twice")
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"{kind}: {value!r} is not a number") from None
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"{kind}: the weight must be a finite number >= 0")
        weights[kind] = weight
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("the weights add up to 0")
    return {kind: weights.get(kind, 0.0) / total for kind in KINDS}


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries: at most `attempts` tries per HTTP request. Before retry k, a random wait of up to
    initial_s × 2**k, at most max_s ("full jitter": concurrent users do not retry in lockstep)."""

    attempts: int = 5
    initial_s: float = 0.5
    max_s: float = 8.0


@dataclass
class VersionStats:
    """What the labeler thought of the answers one model version served."""

    answers: int = 0
    score_sum: float = 0.0
    component_sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("on_topic", "finished", "extra_words", "repetition"), 0.0))
    thumbs_up: int = 0
    thumbs_down: int = 0

    def add(self, score: float, parts: Components) -> None:
        self.answers += 1
        self.score_sum += score
        for name, value in asdict(parts).items():
            self.component_sums[name] += value

    def summary(self) -> dict[str, Any]:
        thumbs = self.thumbs_up + self.thumbs_down
        return {
            "answers": self.answers,
            "mean_score": round(self.score_sum / self.answers, 4) if self.answers else None,
            "mean_components": {k: round(v / self.answers, 4) for k, v in self.component_sums.items()}
            if self.answers else None,
            "thumbs": thumbs,
            # Of the thumbs sent (noise included), as the gateway's feedback stats count them.
            "thumbs_up_rate": round(self.thumbs_up / thumbs, 4) if thumbs else None,
        }


@dataclass
class Report:
    """The outcome of `simulate`; `to_json()` is the CLI's last line."""

    requests: int = 0  # chat requests sent (retries not counted)
    responses: int = 0  # chat requests answered
    answers: int = 0
    feedback: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    failures: dict[str, int] = field(default_factory=lambda: {"chat": 0, "feedback": 0})
    errors: list[str] = field(default_factory=list)  # the first few distinct failure messages
    by_version: dict[str, VersionStats] = field(default_factory=dict)
    stopped: str | None = None  # why the run ended early, if it did
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["by_version"] = {v: s.summary() for v, s in sorted(self.by_version.items())}
        out["seconds"] = round(self.seconds, 3)
        return out


class HttpError(Exception):
    """An error status the gateway answered (after retries, for the retryable ones)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, HttpError):
        return exc.status in RETRY_STATUSES
    return isinstance(exc, httpx.TransportError)


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200] or response.reason_phrase


def post_json(client: httpx.Client, path: str, body: dict[str, Any], retry: RetryPolicy = RetryPolicy()) -> Any:
    """POSTs `body` and returns the decoded answer, retrying what a busy or restarting gateway answers (429,
    502-504, connection errors) within `retry`; any other error status raises at once."""
    for attempt in Retrying(stop=stop_after_attempt(retry.attempts),
                            wait=wait_random_exponential(multiplier=retry.initial_s, max=retry.max_s),
                            retry=retry_if_exception(_retryable), reraise=True):
        with attempt:
            response = client.post(path, json=body)
            if not response.is_success:
                raise HttpError(response.status_code, _error_message(response))
            return response.json()
    raise AssertionError("unreachable: tenacity reraises the last error")


class _Run:
    """One simulation's shared state: the HTTP client, the report (under a lock) and the stop flag."""

    def __init__(self, client: httpx.Client, *, order: Sequence[prompt_sets.Messages], n: int,
                 mix: dict[str, float], labeler: Labeler, max_tokens: int, temperature: float, seed: int,
                 model: str, retry: RetryPolicy) -> None:
        self.client, self.order, self.n, self.labeler = client, order, n, labeler
        self.kinds = [k for k in KINDS if mix.get(k, 0) > 0]
        self.weights = [mix[k] for k in self.kinds]
        self.max_tokens, self.temperature, self.seed, self.model = max_tokens, temperature, seed, model
        self.retry = retry
        self.report = Report()
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return post_json(self.client, path, body, self.retry)

    def _failed(self, where: str, exc: Exception) -> None:
        message = f"{where}: {exc or type(exc).__name__}"
        with self.lock:
            self.report.failures[where] += 1
            if message not in self.report.errors and len(self.report.errors) < MAX_ERRORS_KEPT:
                self.report.errors.append(message)

    def one(self, i: int) -> None:
        """Request i: a chat completion, then one feedback item on its answers."""
        if self.stop.is_set():
            return
        rng = random.Random(f"{self.seed}/{i}")
        labeler = self.labeler.fork(i)
        messages = self.order[i % len(self.order)]
        body = {"model": self.model, "messages": messages, "n": self.n, "max_tokens": self.max_tokens,
                "temperature": self.temperature, "seed": rng.randrange(2**31)}
        with self.lock:
            self.report.requests += 1
        try:
            response = self.post("/v1/chat/completions", body)
            choices = sorted(response["choices"], key=lambda c: c["index"])
            ids = [c["completion_id"] for c in choices]
            answers = [Answer(c["message"]["content"], c.get("finish_reason")) for c in choices]
        except (HttpError, httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            # A refused key or model, or a gateway never reached: every other request would end the same way.
            unreachable = isinstance(exc, httpx.ConnectError) and not self.report.responses
            if unreachable or (isinstance(exc, HttpError) and exc.status in FATAL_STATUSES):
                with self.lock:
                    self.report.stopped = self.report.stopped or f"chat: {exc}"
                self.stop.set()
            self._failed("chat", exc)
            return
        prompt = prompt_sets.prompt_text(messages)
        # The served version: "alignloop-policy/vN" (the gateway's system_fingerprint).
        version = response.get("system_fingerprint") or response.get("model") or "unknown"
        kind = rng.choices(self.kinds, self.weights)[0]
        with self.lock:
            self.report.responses += 1
            self.report.answers += len(answers)
            stats = self.report.by_version.setdefault(version, VersionStats())
            for a in answers:
                parts = components(prompt, a, labeler.weights)
                stats.add(parts.total(labeler.weights), parts)
        try:
            item = self.feedback_item(kind, prompt, ids, answers, labeler, rng)
            self.post("/v1/feedback", item)
        except (HttpError, httpx.HTTPError, ValueError) as exc:
            self._failed("feedback", exc)
            return
        with self.lock:
            self.report.feedback[kind] += 1
            if kind == "thumbs":
                if item["value"] == "up":
                    stats.thumbs_up += 1
                else:
                    stats.thumbs_down += 1

    @staticmethod
    def feedback_item(kind: str, prompt: str, ids: list[str], answers: list[Answer], labeler: Labeler,
                      rng: random.Random) -> dict[str, Any]:
        """The body of POST /v1/feedback for `kind` (see services/gateway/feedback_protocol.py)."""
        if kind in PAIRED and len(ids) < 2:
            raise ValueError(f"{kind} feedback needs two answers or more, the gateway returned {len(ids)}")
        if kind in ("thumbs", "rating"):
            k = rng.randrange(len(ids))
            value: Any = ("up" if labeler.thumbs(prompt, answers[k]) else "down") if kind == "thumbs" \
                else labeler.rating(prompt, answers[k])
            item: dict[str, Any] = {"kind": kind, "completion_id": ids[k], "value": value}
        elif kind == "comparison":
            a, b = rng.sample(range(len(ids)), 2)
            winner = (a, b)[labeler.prefer(prompt, answers[a], answers[b])]
            item = {"kind": kind, "completion_ids": [ids[a], ids[b]], "preferred": ids[winner]}
        else:
            item = {"kind": kind, "completion_ids": [ids[k] for k in labeler.rank(prompt, answers)]}
        # The client's key: a retry after a lost answer is replayed by the gateway, not stored twice.
        item["feedback_id"] = f"sim-{kind}-{ids[0]}"
        return item


def simulate(base_url: str, app_key: str, *, requests: int = 100, n: int = 2,
             mix: dict[str, float] | None = None, labeler: Labeler | None = None, concurrency: int = 4,
             max_tokens: int = 64, temperature: float = 1.0, seed: int = 0, model: str = "alignloop-policy",
             prompts: Sequence[prompt_sets.Messages] | None = None,
             on_progress: Callable[[int, int], None] | None = None, retry: RetryPolicy = RetryPolicy(),
             timeout_s: float = 600.0, transport: httpx.BaseTransport | None = None) -> Report:
    """Sends `requests` chat requests of `n` answers each (at most `concurrency` at a time) and one feedback
    item per response, labelled by `labeler` (default: Labeler(seed=seed)), its kind drawn from `mix` (default:
    a quarter each). `prompts` defaults to the built-in set. `on_progress(done, total)` is called after each
    request. Ctrl-C ends the run early with the report so far (`stopped` says so)."""
    mix = mix or DEFAULT_MIX
    if requests < 0 or n < 1 or concurrency < 1:
        raise ValueError("requests must be >= 0, n and concurrency >= 1")
    if n < 2 and any(mix.get(k, 0) > 0 for k in PAIRED):
        raise ValueError("comparison and ranking feedback need n >= 2")
    order = list(prompts) if prompts is not None else prompt_sets.generate(seed)
    if not order:
        raise ValueError("no prompts")
    random.Random(seed).shuffle(order)
    started = time.monotonic()
    client = httpx.Client(base_url=base_url, timeout=timeout_s, transport=transport,
                          headers={"Authorization": f"Bearer {app_key}"},
                          limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency))
    run = _Run(client, order=order, n=n, mix=mix, labeler=labeler or Labeler(seed=seed), max_tokens=max_tokens,
               temperature=temperature, seed=seed, model=model, retry=retry)
    with client, ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="simulate") as pool:
        futures = [pool.submit(run.one, i) for i in range(requests)]
        try:
            for done, future in enumerate(as_completed(futures), 1):
                future.result()
                if on_progress:
                    on_progress(done, requests)
        except KeyboardInterrupt:
            run.stop.set()  # requests under way finish; the others return at once
            run.report.stopped = "interrupted"
    run.report.seconds = time.monotonic() - started
    return run.report
