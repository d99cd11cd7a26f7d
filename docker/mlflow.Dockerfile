# syntax=docker/dockerfile:1.7
# The MLflow tracking server and registry for docker-compose.yml: PostgreSQL backend, S3 (MinIO) artifacts.
# The client-side MLflow in alignloop's images is the same version (requirements/lock-cpu.txt).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN python -m venv /opt/mlflow
RUN /opt/mlflow/bin/pip install --no-cache-dir mlflow==3.17.2 "psycopg[binary]==3.3.9" boto3==1.44.5

FROM ${PYTHON_IMAGE}
RUN groupadd --gid 10001 mlflow && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin mlflow
COPY --from=build /opt/mlflow /opt/mlflow
COPY --chmod=0755 docker/mlflow/ensure_bucket.py /usr/local/bin/mlflow-ensure-bucket
ENV PATH=/opt/mlflow/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
USER 10001:10001
EXPOSE 5000
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
