#!/bin/sh
# Installs the Debian packages named as arguments when their commands are missing.
# As root it uses apt-get; otherwise it says what to install and fails.
set -eu
missing=""
installed() {
    case "$1" in
        aria2) command -v aria2c ;;
        docker.io) command -v dockerd ;;
        # Debian keeps the server programs off PATH, in /usr/lib/postgresql/<version>/bin.
        postgresql) command -v initdb || ls /usr/lib/postgresql/*/bin/initdb ;;
        *) command -v "$1" ;;
    esac >/dev/null 2>&1
}
for package in "$@"; do
    installed "$package" || missing="$missing $package"
done
# Debian splits venv support out of python3.
python3 -c "import ensurepip, venv" >/dev/null 2>&1 || missing="$missing python3-venv"
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "missing system packages:$missing — install them (e.g. sudo apt-get install$missing)" >&2
    exit 1
fi
echo "installing:$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing >/dev/null
