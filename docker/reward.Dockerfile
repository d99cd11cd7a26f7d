# syntax=docker/dockerfile:1.7
# The reward service (services/reward). On a GPU node build it with ALIGNLOOP_BASE=alignloop/base-cuda:0.1.0.
# The build stages (gRPC stubs, the wheel, the locked environment) are in base.Dockerfile; this adds the entry point.
ARG ALIGNLOOP_BASE=alignloop/base:0.1.0
FROM ${ALIGNLOOP_BASE}
USER 10001:10001
EXPOSE 50053 9465
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 CMD ["alignloop-probe", "reward"]
CMD ["python", "-m", "services.reward"]
