#!/usr/bin/env bash
# mypy --strict over the package as it installs: the top-level folders are mapped under
# `cnnserve.` by setuptools' package-dir, which mypy cannot follow, so mirror that mapping
# with symbolic links in build/typecheck and check the mirrored package.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
tree=build/typecheck/cnnserve
rm -rf build/typecheck
mkdir -p "$tree"
for f in common/*.py common/py.typed; do [ -e "$f" ] && ln -s "$root/$f" "$tree/$(basename "$f")"; done
for pkg in training server client proto; do ln -s "$root/$pkg" "$tree/$pkg"; done
cd build/typecheck
exec "${CNNSERVE_VENV:-$root/.venv}/bin/mypy" --config-file "$root/pyproject.toml" -p cnnserve
