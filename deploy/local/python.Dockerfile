# A local stand-in for python:3.11-slim-bookworm, from Debian's own packages (Debian bookworm's
# python3 is 3.11): `python` and `pip` on the PATH, and pip may install into the system Python
# as it does in the public image. Built by scripts/compose_test.py; never pushed anywhere.
ARG DEBIAN_IMAGE=bird-local/debian:bookworm
FROM ${DEBIAN_IMAGE}
ENV LANG=C.UTF-8
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-pip python3-venv python-is-python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && rm -f /usr/lib/python3.*/EXTERNALLY-MANAGED \
    && python --version && pip --version
CMD ["python3"]
