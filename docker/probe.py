#!/usr/bin/env python3
"""`alignloop-probe NAME`: exit 0 when the service NAME in this container is ready, 1 when not.

Docker HEALTHCHECKs run it (Kubernetes asks the gRPC services itself, with native `grpc:` probes). The gRPC
services are asked over grpc.health.v1 (alignloop/grpc_health.py), the gateway at /readyz and the
materializer at /metrics. Ports come from the same ALIGNLOOP_* settings the service reads; the service binds
0.0.0.0, so 127.0.0.1 reaches it.
"""

from __future__ import annotations

import sys

from alignloop import components
from alignloop.config import Settings


def serving(port: int) -> bool:
    return components.grpc_serving(f"127.0.0.1:{port}")


def checks(s: Settings) -> dict:
    local = "127.0.0.1"
    return {
        "gateway": lambda: components.http_ok(f"http://{local}:{s.gateway_port}/readyz"),
        "policy": lambda: serving(s.policy_port),
        # The canary is ready while it waits for a challenger (it answers; the gateway falls back meanwhile).
        "policy-canary": lambda: serving(s.policy_port),
        "feedback": lambda: serving(s.feedback_port),
        "materializer": lambda: components.http_ok(f"http://{local}:{s.materializer_port}/metrics"),
        "reward": lambda: serving(s.reward_port),
        "pipeline": lambda: serving(s.pipeline_port),
    }


def main(argv: list[str]) -> int:
    probes = checks(Settings())
    if len(argv) != 1 or argv[0] not in probes:
        print(f"usage: alignloop-probe {{{','.join(probes)}}}", file=sys.stderr)
        return 2
    return 0 if probes[argv[0]]() else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
