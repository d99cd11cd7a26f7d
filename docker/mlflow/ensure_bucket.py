#!/usr/bin/env python3
"""Creates the artifact bucket named by MLFLOW_ARTIFACTS_BUCKET on the S3 endpoint in MLFLOW_S3_ENDPOINT_URL
if it is missing; run before `mlflow server` so a fresh MinIO volume needs no manual step."""

import os
import sys
import time

import boto3
from botocore.exceptions import ClientError, EndpointConnectionError


def main() -> int:
    bucket = os.environ["MLFLOW_ARTIFACTS_BUCKET"]
    s3 = boto3.client("s3", endpoint_url=os.environ["MLFLOW_S3_ENDPOINT_URL"])
    for _ in range(30):  # MinIO may still be starting
        try:
            s3.head_bucket(Bucket=bucket)
            return 0
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
                raise
            s3.create_bucket(Bucket=bucket)
            print(f"created bucket {bucket}", file=sys.stderr)
            return 0
        except EndpointConnectionError:
            time.sleep(2)
    print(f"S3 endpoint {os.environ['MLFLOW_S3_ENDPOINT_URL']} unreachable", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
