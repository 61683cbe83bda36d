# ut-tunnel container image: WireGuard's UDP over TCP+mTLS lanes.
#
#   docker build -t ut-tunnel .
#   docker run --rm ut-tunnel --version          # "... (compiled fast path)"
#   docker run -d -v "$PWD/ut:/etc/ut:ro" -p 5443:5443 ut-tunnel
#
# The configuration and the certificates are mounted at /etc/ut at run time (see
# deploy/compose.yaml and docs/guide.md, "Docker"); nothing secret is in the image.
# Inside a container the metrics must listen on 0.0.0.0:5080 to be reachable through a
# published port (the default 127.0.0.1:5080 only answers inside the container).

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# ---------------------------------------------------------------- builder: the wheel
FROM ${PYTHON_IMAGE} AS builder

# A C compiler for the Cython fast path. Not pinned: the Debian release of the base
# image fixes the versions, and build-essential exists only in this throw-away stage.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . .

# UT_REQUIRE_EXTENSION=1: fail the build rather than ship the pure-Python fallback.
# The wheel's build dependencies (setuptools, Cython) come from pyproject.toml.
ENV UT_REQUIRE_EXTENSION=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && ls -l /wheels

# ---------------------------------------------------------------- runtime: only the wheel
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="ut-tunnel" \
      org.opencontainers.image.description="WireGuard's UDP over several TCP+mTLS lanes" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed, numeric, unprivileged user (uid/gid 10001): mounted private keys must be
# readable by it (chown 10001 on the host; docs/guide.md).
RUN groupadd --system --gid 10001 ut \
 && useradd --system --uid 10001 --gid ut --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin ut

# Only binary wheels: this stage has no compiler and needs none. The dependencies
# (PyYAML, prometheus-client, h11, cryptography, uvloop) come as wheels from the index.
COPY --from=builder /wheels /wheels
RUN pip install --no-cache-dir --disable-pip-version-check --only-binary=:all: /wheels/*.whl \
 && rm -rf /wheels \
 && ut-tunnel --version

# Python writes nothing to disk and logs unbuffered (JSON lines on stderr).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    UT_HEALTH_URL=http://127.0.0.1:5080/metrics

USER 10001:10001
WORKDIR /etc/ut

# 5443: the server's TCP+TLS lanes (tcp.listen_addr). 5080: Prometheus metrics
# (metrics.listen_addr; set it to 0.0.0.0:5080 in the container's config to publish it).
EXPOSE 5443 5080

# Alive = the metrics endpoint answers (it runs on the tunnel's own event loop, so a
# wedged loop fails the check). Works with the default metrics address even when it is
# 127.0.0.1:5080, because the check runs inside the container. With metrics disabled or
# elsewhere, set UT_HEALTH_URL or run with --no-healthcheck.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['UT_HEALTH_URL'], timeout=4).read(1)"]

ENTRYPOINT ["ut-tunnel"]
CMD ["-config", "/etc/ut/ut.yaml"]
