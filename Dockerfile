# runway-gateway: slim, non-root. Mount the config at /etc/runway-gateway/gateway.toml.
#
# The base image is pinned by version. For byte-identical rebuilds pin its digest too:
#   docker buildx imagetools inspect python:3.11.16-slim-bookworm     # prints the digest
#   docker build --build-arg PYTHON_IMAGE=python:3.11.16-slim-bookworm@sha256:<digest> .
# Dependencies come only from requirements.lock (exact versions, every file's sha256),
# generated from pyproject.toml with pip-tools; regenerate it after changing the
# dependencies (see the command at the top of requirements.lock).
ARG PYTHON_IMAGE=python:3.11.16-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/runway-gateway
ENV PATH=/opt/runway-gateway/bin:$PATH
WORKDIR /src
COPY requirements.lock ./
# Wheels only, each checked against its hash; setuptools (the build backend) is locked too.
RUN pip install --require-hashes --only-binary=:all: --no-deps -r requirements.lock
COPY pyproject.toml README.md ./
COPY gateway ./gateway
# The project itself: no dependency resolution and no download at this step.
RUN pip install --no-deps --no-build-isolation --no-index . \
 && pip uninstall --yes setuptools

FROM ${PYTHON_IMAGE}
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin gateway \
 && mkdir -p /app/data /etc/runway-gateway && chown gateway /app/data
COPY --from=build /opt/runway-gateway /opt/runway-gateway
ENV PATH=/opt/runway-gateway/bin:$PATH PYTHONUNBUFFERED=1
WORKDIR /app
USER 10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=2s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"
ENTRYPOINT ["runway-gateway"]
# `serve` applies the [server] connection limits of the mounted config to every worker:
# header and body deadlines, idle keep-alive close, max_connections_per_worker
# (docs/operations.md, "Timeouts and limits").
CMD ["serve", "--config", "/etc/runway-gateway/gateway.toml", "--host", "0.0.0.0", "--port", "8080"]
