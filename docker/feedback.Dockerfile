# syntax=docker/dockerfile:1.7
# The feedback service (services/feedback): `collector` (gRPC, the default) or `materializer` (Kafka -> store).
# The build stages (gRPC stubs, the wheel, the locked environment) are in base.Dockerfile; this adds the entry point.
ARG ALIGNLOOP_BASE=alignloop/base:0.1.0
FROM ${ALIGNLOOP_BASE}
USER 10001:10001
EXPOSE 50052 9464
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 CMD ["alignloop-probe", "feedback"]
CMD ["python", "-m", "services.feedback", "collector"]
