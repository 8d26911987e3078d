#!/usr/bin/env bash
# The main job on a fresh machine: set up (scripts/bootstrap.sh), train and export the default
# model if the repository is empty (scripts/prepare-model.sh), then serve it.
# Extra arguments go to `cnnserve serve` (see `cnnserve serve --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
export PATH=$PWD/.venv/bin:$PATH
export CNNSERVE_REPOSITORY=${CNNSERVE_REPOSITORY:-$PWD/models}
scripts/prepare-model.sh "$CNNSERVE_REPOSITORY"
port=${CNNSERVE_GRPC_PORT:-8001}
# Flags given to this script may move the ports: the server's own "serving gRPC on" line is exact.
cat <<MSG
run: serving $CNNSERVE_REPOSITORY on gRPC port $port unless flags below change it (metrics: http://localhost:${CNNSERVE_METRICS_PORT:-8002}/metrics)
run: try it from another shell:
       .venv/bin/cnnserve classify --url localhost:$port --model ${CNNSERVE_DEFAULT_MODEL:-fashion-cnn} IMAGE.png
       .venv/bin/cnnserve batch --url localhost:$port --model ${CNNSERVE_DEFAULT_MODEL:-fashion-cnn} --input fashion-mnist:test --output predictions.jsonl
MSG
exec cnnserve serve --repository "$CNNSERVE_REPOSITORY" "$@"
