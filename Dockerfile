# progress relay: a slim, non-root image. Configure with RELAY_* environment variables
# (at least RELAY_AUTH_SECRET and RELAY_REDIS_URL), or mount a relay.toml and set RELAY_CONFIG.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    RELAY_SERVER_HOST=0.0.0.0 RELAY_SERVER_PORT=8765 RELAY_LOG_FORMAT=json

WORKDIR /app
COPY pyproject.toml README.md ./
COPY relay ./relay
RUN pip install ".[speed]" && useradd --system --uid 10001 relay

USER relay
EXPOSE 8765
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD python -c "import urllib.request,os; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('RELAY_SERVER_PORT','8765'), timeout=2)"
STOPSIGNAL SIGTERM
CMD ["relay", "serve"]
