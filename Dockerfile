# runway-gateway: slim, non-root. Mount the config at /etc/runway-gateway/gateway.toml.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin gateway \
 && mkdir -p /app/data /etc/runway-gateway && chown gateway /app/data
COPY --from=build /install /usr/local
WORKDIR /app
USER 10001
ENV PYTHONUNBUFFERED=1
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=2s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"
ENTRYPOINT ["runway-gateway"]
CMD ["serve", "--config", "/etc/runway-gateway/gateway.toml", "--host", "0.0.0.0", "--port", "8080"]
