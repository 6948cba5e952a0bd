# progress relay: a slim, non-root image running `relay serve`.
# Configure it with RELAY_* environment variables (at least RELAY_AUTH_SECRET and
# RELAY_REDIS_URL; every key of relay.toml has one), or mount a relay.toml and set RELAY_CONFIG.
# compose.yaml runs it next to Redis. tests/test_container.py starts `relay serve` with the
# environment set here.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RELAY_SERVER_HOST=0.0.0.0 RELAY_SERVER_PORT=8765 RELAY_LOG_FORMAT=json

WORKDIR /app
COPY pyproject.toml README.md ./
COPY relay ./relay
# the `speed` extra brings uvloop; the package (Lua script, static files) goes to site-packages
RUN pip install ".[speed]" \
    && useradd --system --uid 10001 --user-group --no-create-home relay

# numeric, so that Kubernetes' runAsNonRoot can verify it
USER 10001:10001
EXPOSE 8765
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('RELAY_SERVER_PORT', '8765'), timeout=2)"]
# relay serve closes every connection with 1012 and exits 0 on SIGTERM
STOPSIGNAL SIGTERM
CMD ["relay", "serve"]
