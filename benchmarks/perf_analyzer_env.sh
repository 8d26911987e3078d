#!/usr/bin/env bash
# Set up Triton's native load generator, perf_analyzer, for benchmarks/bench_server.py.
#
#   benchmarks/perf_analyzer_env.sh [VENV]      (default VENV: .bench/pa-venv under the repo)
#
# Creates VENV with tritonclient[grpc]==2.41.0 (its wheel ships the perf_analyzer binary),
# protobuf 6 and nvidia-cuda-runtime-cu12 (perf_analyzer links libcudart even without a GPU),
# installs the Debian package libb64-0d it also links (apt-get; needs root), writes the
# wrapper VENV/bin/pa that puts libcudart on LD_LIBRARY_PATH, checks that `pa --help` prints the usage,
# and prints the wrapper's path on stdout (everything else goes to stderr).
# Idempotent: a second run with the same requirements only re-checks the binary.
# Environment: PYTHON (interpreter for the venv, default python3).
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${1:-$repo_root/.bench/pa-venv}
python=${PYTHON:-python3}
requirements=("tritonclient[grpc]==2.41.0" "protobuf>=6.30,<7" "nvidia-cuda-runtime-cu12")
stamp="$venv/.requirements"
wrapper="$venv/bin/pa"

log() { echo "perf_analyzer_env: $*" >&2; }

if [[ ! -x "$venv/bin/python" ]]; then
    log "creating $venv"
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv"
fi

if [[ ! -f "$stamp" || "$(cat "$stamp")" != "${requirements[*]}" ]]; then
    log "installing ${requirements[*]}"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${requirements[@]}" >&2
    printf '%s' "${requirements[*]}" >"$stamp"
fi

if ! ldconfig -p | grep -q 'libb64\.so\.0d'; then
    if [[ $(id -u) -ne 0 ]]; then
        log "perf_analyzer needs libb64.so.0d: run 'apt-get install libb64-0d' as root"
        exit 1
    fi
    log "installing libb64-0d"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q libb64-0d >&2 || { apt-get update -q >&2 && apt-get install -y -q libb64-0d >&2; }
fi

cudart=$("$venv/bin/python" -c 'import nvidia.cuda_runtime as m, os; print(os.path.join(list(m.__path__)[0], "lib"))')
binary="$venv/bin/perf_analyzer"
if [[ ! -x "$binary" ]]; then
    log "no perf_analyzer binary at $binary: the tritonclient wheel did not install it"
    exit 1
fi
cat >"$wrapper" <<EOF
#!/usr/bin/env bash
# perf_analyzer with the libcudart it links (written by benchmarks/perf_analyzer_env.sh)
export LD_LIBRARY_PATH="$cudart\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$binary" "\$@"
EOF
chmod +x "$wrapper"

# `--help` exits 99 ("unrecognized option") after printing the usage: a binary that loaded
# all its libraries prints the usage, one that did not prints the loader's error.
help=$("$wrapper" --help 2>&1 || true)
if [[ "$help" != *"--concurrency-range"* ]] || ! "$wrapper" --version >/dev/null 2>&1; then
    log "perf_analyzer does not run:"
    echo "$help" | head -5 >&2
    exit 1
fi
echo "$wrapper"
