"""Prometheus metrics of the gateway."""

import time

from prometheus_client import Counter, Histogram

from services.gateway.asgi import HttpMiddleware

REQUESTS = Counter("alignloop_gateway_requests_total", "HTTP requests by route and status.", ["route", "status"])
LATENCY = Histogram(
    "alignloop_gateway_request_seconds", "Time to the response's headers, by route.", ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
TTFT = Histogram(
    "alignloop_gateway_time_to_first_token_seconds", "Streaming: request received to first token.",
    buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10),
)
RETIRING_KEY_REQUESTS = Counter(
    "alignloop_gateway_retiring_key_requests_total",
    "Requests authenticated by a rotated-out key in its grace period, by key name: who has yet to switch.",
    ["name"],
)
GENERATED_TOKENS = Counter("alignloop_gateway_generated_tokens_total", "Completion tokens served.")
PROMPT_TOKENS = Counter("alignloop_gateway_prompt_tokens_total", "Prompt tokens of the requests answered.")
CACHED_PROMPT_TOKENS = Counter(
    "alignloop_gateway_cached_prompt_tokens_total",
    "Of the prompt tokens, those the policy's engine found in its prefix cache: divided by the prompt tokens, "
    "the share of prefill work that shared prefixes (system prompts, conversation history) saved.",
)


def count_tokens(prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> None:
    """One answered request's tokens."""
    PROMPT_TOKENS.inc(prompt_tokens)
    CACHED_PROMPT_TOKENS.inc(cached_tokens)
    GENERATED_TOKENS.inc(completion_tokens)


class RequestMetrics(HttpMiddleware):
    """Counts each request and times it to its response's headers, by route."""

    async def http(self, scope, receive, send) -> None:
        started = time.perf_counter()
        status = 500

        async def send_and_count(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                route = scope.get("route")
                path = route.path if route is not None else "unmatched"
                REQUESTS.labels(path, str(status)).inc()
                LATENCY.labels(path).observe(time.perf_counter() - started)
            await send(message)

        await self.app(scope, receive, send_and_count)
POLICY_REQUESTS = Counter("alignloop_gateway_policy_requests_total",
                          "Chat requests sent to each policy service (champion, challenger).", ["role"])
CANARY_FALLBACKS = Counter("alignloop_gateway_canary_fallbacks_total",
                           "Requests meant for the challenger that the champion answered (canary unreachable).")
