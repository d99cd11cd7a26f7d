import logging

import uvicorn

from alignloop.config import Settings
from services.gateway.app import create_app


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.gateway_port,
        log_level="info",
        access_log=False,  # per-request counts and latencies are in /metrics
        timeout_graceful_shutdown=settings.drain_s,  # in-flight requests and streams finish first
    )


if __name__ == "__main__":
    main()
