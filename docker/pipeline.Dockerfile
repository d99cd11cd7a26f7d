# syntax=docker/dockerfile:1.7
# The pipeline runner (services/pipeline). Its steps run in this container (LocalLauncher), PPO under torchrun on its GPUs.
# The build stages (gRPC stubs, the wheel, the locked environment) are in base.Dockerfile; this adds the entry point.
ARG ALIGNLOOP_BASE=alignloop/base-cuda:0.1.0
FROM ${ALIGNLOOP_BASE}
USER 10001:10001
EXPOSE 50054 9466
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 CMD ["alignloop-probe", "pipeline"]
CMD ["python3", "-m", "services.pipeline"]
