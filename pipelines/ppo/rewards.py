"""Where PPO's rewards come from: the reward service over gRPC (the default: the same live RM that serving
and evaluation ask), the RM in-process (a single box without the service), or a Python function
("module:callable", for rule-based rewards and tests).

All three score a batch of (conversation, answer) and say which model version scored it, so a PPO run can
record the RM version it climbed.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Protocol

from tenacity import retry, retry_if_exception, stop_after_delay, wait_exponential

Messages = Sequence[dict]


class RewardSource(Protocol):
    version: str | None  # "NAME/VERSION" of the model that scored the last batch, None for a function

    def score(self, conversations: Sequence[Messages], responses: Sequence[str]) -> list[float]:
        """One reward per (conversation, response), in order."""
        ...

    def close(self) -> None: ...


def _transient(exc: BaseException) -> bool:
    import grpc

    return isinstance(exc, grpc.RpcError) and exc.code() in (grpc.StatusCode.UNAVAILABLE,
                                                              grpc.StatusCode.DEADLINE_EXCEEDED)


class GrpcReward:
    """The reward service's Score, in calls of at most its `max_items`; retried while it is unavailable
    (a restart or a model swap of the service must not kill a long PPO run)."""

    def __init__(self, address: str, timeout_s: float = 120.0) -> None:
        import grpc

        from alignloop.grpc_channels import channel_options
        from alignloop.v1 import reward_pb2 as pb
        from alignloop.v1 import reward_pb2_grpc as pb_grpc

        self._pb = pb
        # Every reward replica gets a share of the scoring, and a replica that is stopping hands its calls on.
        self._channel = grpc.insecure_channel(address, options=channel_options(
            ("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20),
            health_checked=True))
        self._stub = pb_grpc.RewardServiceStub(self._channel)
        self.timeout_s = timeout_s
        info = self._call(self._stub.GetInfo, pb.GetRewardInfoRequest())
        self.max_items = max(1, info.max_items)
        self.untrained = info.untrained
        self.version = f"{info.model.name}/{info.model.version}"

    @retry(retry=retry_if_exception(_transient), wait=wait_exponential(multiplier=0.5, max=5),
           stop=stop_after_delay(120), reraise=True)
    def _call(self, method, request):
        return method(request, timeout=self.timeout_s)

    def score(self, conversations: Sequence[Messages], responses: Sequence[str]) -> list[float]:
        from alignloop.v1 import policy_pb2

        out: list[float] = []
        versions = set()
        for start in range(0, len(responses), self.max_items):
            items = [self._pb.ScoreItem(messages=[policy_pb2.ChatMessage(role=m["role"], content=m["content"])
                                                  for m in conv], response=resp)
                     for conv, resp in zip(conversations[start:start + self.max_items],
                                           responses[start:start + self.max_items], strict=True)]
            reply = self._call(self._stub.Score, self._pb.ScoreRequest(items=items))
            out.extend(reply.rewards)
            versions.add(f"{reply.model.name}/{reply.model.version}")
        # A promotion between two calls of one batch would mix versions; record them all.
        self.version = ",".join(sorted(versions)) or self.version
        return out

    def close(self) -> None:
        self._channel.close()


class InProcessReward:
    """A saved reward model (alignloop.reward_model format) scored in this process."""

    def __init__(self, folder, version: str | None = None, device: str = "cpu", batch_size: int = 32) -> None:
        from alignloop.reward_model import RewardModel

        self.model, self.tokenizer = RewardModel.load(folder, device=device)
        self.version = version
        self.batch_size = batch_size

    def score(self, conversations: Sequence[Messages], responses: Sequence[str]) -> list[float]:
        from alignloop.reward_model import render

        texts = [render(conv, resp) for conv, resp in zip(conversations, responses, strict=True)]
        return self.model.score(self.tokenizer, texts, batch_size=self.batch_size)

    def close(self) -> None:
        pass


class FunctionReward:
    """`module:callable` taking (conversations, responses) and returning one float per response."""

    def __init__(self, spec: str) -> None:
        module, _, name = spec.partition(":")
        if not module or not name:
            raise ValueError(f"reward function {spec!r}: expected 'module:callable'")
        fn = getattr(importlib.import_module(module), name, None)
        if not callable(fn):
            raise ValueError(f"reward function {spec!r}: {name} is not a callable of {module}")
        self.fn: Callable = fn
        self.version = None
        self.spec = spec

    def score(self, conversations: Sequence[Messages], responses: Sequence[str]) -> list[float]:
        rewards = [float(r) for r in self.fn(conversations, responses)]
        if len(rewards) != len(responses):
            raise ValueError(f"{self.spec} returned {len(rewards)} rewards for {len(responses)} responses")
        return rewards

    def close(self) -> None:
        pass
