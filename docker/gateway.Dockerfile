# syntax=docker/dockerfile:1.7
# The gateway (services/gateway): OpenAI-compatible HTTP, feedback and operator routes.
# The build stages (gRPC stubs, the wheel, the locked environment) are in base.Dockerfile; this adds the entry point.
ARG ALIGNLOOP_BASE=alignloop/base:0.1.0
FROM ${ALIGNLOOP_BASE}
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 CMD ["alignloop-probe", "gateway"]
CMD ["python", "-m", "services.gateway"]
