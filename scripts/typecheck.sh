#!/usr/bin/env bash
# mypy --strict over the package as it installs: the top-level folders are mapped under
# `cnnserve.` by setuptools' package-dir, which mypy cannot follow, so mirror that mapping
# with symbolic links in a private temporary folder and check the mirrored package.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=$(mktemp -d "${TMPDIR:-/tmp}/cnnserve-typecheck.XXXXXX")
trap 'rm -rf "$work"' EXIT
tree=$work/cnnserve
mkdir -p "$tree"
for f in common/*.py common/py.typed; do [ -e "$f" ] && ln -s "$root/$f" "$tree/$(basename "$f")"; done
for pkg in training server client proto; do ln -s "$root/$pkg" "$tree/$pkg"; done
cd "$work"
"${CNNSERVE_VENV:-$root/.venv}/bin/mypy" --config-file "$root/pyproject.toml" \
    --cache-dir "$root/.mypy_cache" -p cnnserve
