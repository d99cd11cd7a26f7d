#!/usr/bin/env python3
"""`alignloop-probe NAME`: exit 0 when the service NAME in this container is ready, 1 when not.

Docker HEALTHCHECKs and Kubernetes exec probes run it. The gRPC services answer their own readiness calls
(GetInfo, Health), not grpc.health.v1, so a native gRPC probe cannot ask them. Ports come from the same
ALIGNLOOP_* settings the service reads; the service binds 0.0.0.0, so 127.0.0.1 reaches it.
"""

from __future__ import annotations

import sys

from alignloop import components
from alignloop.config import Settings


def checks(s: Settings) -> dict:
    local = "127.0.0.1"
    return {
        "gateway": lambda: components.http_ok(f"http://{local}:{s.gateway_port}/readyz"),
        "policy": lambda: components.policy_ready(f"{local}:{s.policy_port}"),
        # The canary has nothing to serve until an operator names a challenger: answering is ready.
        "policy-canary": lambda: components.policy_info(f"{local}:{s.policy_port}") is not None,
        "feedback": lambda: components.feedback_ready(f"{local}:{s.feedback_port}"),
        "materializer": lambda: components.http_ok(f"http://{local}:{s.materializer_port}/metrics"),
        "reward": lambda: components.reward_ready(f"{local}:{s.reward_port}"),
        "pipeline": lambda: components.pipeline_ready(f"{local}:{s.pipeline_port}"),
    }


def main(argv: list[str]) -> int:
    probes = checks(Settings())
    if len(argv) != 1 or argv[0] not in probes:
        print(f"usage: alignloop-probe {{{','.join(probes)}}}", file=sys.stderr)
        return 2
    return 0 if probes[argv[0]]() else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
