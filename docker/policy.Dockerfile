# syntax=docker/dockerfile:1.7
# The policy service (services/policy): vLLM on CUDA. The canary runs this image with ALIGNLOOP_POLICY_PORT, ALIGNLOOP_POLICY_MODEL_ALIAS=challenger and ALIGNLOOP_POLICY_WAIT_FOR_ALIAS=true.
# The build stages (gRPC stubs, the wheel, the locked environment) are in base.Dockerfile; this adds the entry point.
ARG ALIGNLOOP_BASE=alignloop/base-cuda:0.1.0
FROM ${ALIGNLOOP_BASE}
USER 10001:10001
EXPOSE 50051
HEALTHCHECK --interval=10s --timeout=5s --start-period=900s --retries=3 CMD ["alignloop-probe", "policy"]
CMD ["python3", "-m", "services.policy"]
