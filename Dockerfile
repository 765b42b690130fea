# MistRelay: aria2, rclone and ffmpeg from Debian; runs as a non-root user; data in /data.
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends aria2 rclone ffmpeg ca-certificates tini \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 mistrelay \
 && mkdir -p /data \
 && chown mistrelay:mistrelay /data

WORKDIR /app
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt

COPY app.py cluster.py configer.py db.py events.py files.py metrics.py records.py config.yaml ./
COPY aria2_client ./aria2_client
COPY uploads ./uploads
COPY bot ./bot
COPY webstreamer ./webstreamer

# The database, downloads and generated secrets (web token, link key, aria2 secret) live in the
# volume. The embedded aria2c's RPC stays on 127.0.0.1 inside the container; only the web server
# listens on the container's interfaces so that a published port reaches it.
ENV MISTRELAY_DATABASE_PATH=/data/mistrelay.db \
    MISTRELAY_ARIA2_DOWNLOAD_DIR=/data/downloads \
    MISTRELAY_WEB_HOST=0.0.0.0 \
    MISTRELAY_WEB_PORT=8080 \
    PYTHONUNBUFFERED=1

USER mistrelay
VOLUME ["/data"]
EXPOSE 8080
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["python", "app.py"]
