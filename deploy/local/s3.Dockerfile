# A local stand-in for MinIO (which Debian does not package): moto's S3 server, plus boto3 for
# the one-shot that creates the bucket. Its objects live in memory, not in the minio-data
# volume. Built by scripts/compose_test.py; never pushed anywhere.
ARG PYTHON_IMAGE=bird-local/python:3.11-bookworm
FROM ${PYTHON_IMAGE}
# 5.1.x: moto 5.2.1 answers CompleteMultipartUpload with a root element that the AWS C++ SDK
# inside pyarrow (Ray Train and Ray Data writing to S3) takes for an error.
ARG MOTO_VERSION=5.1.22
RUN pip install --no-cache-dir "moto[server]==${MOTO_VERSION}" boto3
EXPOSE 9000
CMD ["moto_server", "--host", "0.0.0.0", "--port", "9000"]
