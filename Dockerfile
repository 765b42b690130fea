# MistRelay on Debian bookworm: Debian's python3 with a virtualenv, aria2, rclone and ffmpeg from
# Debian; runs as the non-root user mistrelay (uid 10001); data in the volume /data.
#
#   docker build -t mistrelay .
#   docker run -d -p 8080:8080 -v mistrelay-data:/data mistrelay
#
# BASE may name another Debian bookworm image (e.g. one made locally with debootstrap).
# Layers go from the least to the most often changed: system packages, Python packages, code.
ARG BASE=debian:bookworm-slim
FROM ${BASE}

ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        python3 python3-venv aria2 rclone ffmpeg unar zstd ca-certificates tini \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 --user-group mistrelay \
 && mkdir -p /data \
 && chown mistrelay:mistrelay /data \
 && chmod 0700 /data

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv

WORKDIR /app
COPY requirements.txt ./
# pip settings for a build behind a proxy or a private index (a pip.conf, and a CA bundle it may
# name as /run/secrets/pip-ca) come in as build secrets, which no layer keeps:
#   docker build --secret id=pip-conf,src=PIP.CONF --secret id=pip-ca,src=CA.PEM .
RUN --mount=type=secret,id=pip-conf \
    --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip-conf; fi \
 && pip install --no-cache-dir --disable-pip-version-check -r requirements.txt

# Every top-level module and every package folder; .dockerignore keeps tests and data out.
COPY *.py config.yaml ./
COPY aria2_client ./aria2_client
COPY bot ./bot
COPY uploads ./uploads
COPY webstreamer ./webstreamer

# The database, downloads and generated secrets (web token, link key, aria2 secret) live in the
# volume. The embedded aria2c's RPC stays on 127.0.0.1 inside the container; only the web server
# listens on the container's interfaces so that a published port reaches it.
ENV MISTRELAY_DATABASE_PATH=/data/mistrelay.db \
    MISTRELAY_ARIA2_DOWNLOAD_DIR=/data/downloads \
    MISTRELAY_WEB_HOST=0.0.0.0 \
    MISTRELAY_WEB_PORT=8080 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

USER mistrelay
VOLUME ["/data"]
EXPOSE 8080
# Healthy while the web server answers and the service reaches its aria2.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import json, os, urllib.request as r; h = json.load(r.urlopen('http://127.0.0.1:%s/api/health' % os.environ.get('MISTRELAY_WEB_PORT', '8080'), timeout=5)); raise SystemExit(h.get('status') != 'ok' or h.get('aria2') != 'connected')"]
# On SIGTERM the service stops in order: aria2's session saved, aria2c ended, the database
# closed. tini passes it on and reaps the processes the service leaves behind.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["python", "app.py"]
