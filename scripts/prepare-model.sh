#!/usr/bin/env bash
# Make sure the model repository holds a model: if it has no model version yet, train the
# default model (fashion-cnn on Fashion-MNIST, the `cnnserve train` defaults) and export it.
# Used by scripts/run.sh and by the trainer container. Needs `cnnserve` (extra "train") on PATH.
#   REPOSITORY (default ./models)  MODEL_NAME (default fashion-cnn)  RUN_DIR (default ./runs/$MODEL_NAME)
set -euo pipefail
REPOSITORY=${1:-${CNNSERVE_REPOSITORY:-models}}
MODEL_NAME=${CNNSERVE_DEFAULT_MODEL:-fashion-cnn}
RUN_DIR=${CNNSERVE_RUN_DIR:-runs/$MODEL_NAME}
mkdir -p "$REPOSITORY"
if compgen -G "$REPOSITORY/*/[1-9]*/model.onnx" >/dev/null; then
    echo "prepare-model: $REPOSITORY already holds a model; nothing to train"
    exit 0
fi
if [ -f "$RUN_DIR/metrics.json" ] && [ -f "$RUN_DIR/checkpoint.pt" ]; then
    echo "prepare-model: reusing the finished training run in $RUN_DIR"
else
    echo "prepare-model: $REPOSITORY is empty; training $MODEL_NAME (a few minutes on 2 cores)"
    cnnserve train --out "$RUN_DIR" ${CNNSERVE_TRAIN_ARGS:-}
fi
cnnserve export "$RUN_DIR/checkpoint.pt" --repository "$REPOSITORY" --name "$MODEL_NAME"
