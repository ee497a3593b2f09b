#!/usr/bin/env bash
# Runs (or resumes) one issue-7 reproduction and writes its committed results folder.
#
#   bash experiments/reproduce.sh takd|noisy|generations|mate
#
# CIFAR-10 is read from $CIFAR10_NPZ (default /tmp/cifar10.npz: decode the JPEG copy first with
#   python3 ../shared/data/convert/cifar10_jpegbytes.py decode \
#       ../shared/data/cifar10_jpegbytes.npz /tmp/cifar10.npz
# ), MNIST from $MNIST_NPZ (default ../shared/data/mnist.npz). A killed run resumes from its last
# checkpoint when the same command is run again; the data path is part of the run's config, so
# keep it the same.
set -euo pipefail
cd "$(dirname "$0")/.."
CIFAR10_NPZ=${CIFAR10_NPZ:-/tmp/cifar10.npz}
MNIST_NPZ=${MNIST_NPZ:-../shared/data/mnist.npz}
PYTHON=${PYTHON:-python}

run() {  # config name, workdir, data file, [config argument]
  local config=experiments/configs/$1.py workdir=$2 npz=$3 arg=${4:-}
  local command="python -m kdjax.main --config=${config}${arg} --workdir=${workdir} --config.data.npz=${npz}"
  echo "$command"
  $PYTHON -m kdjax.main --config="${config}${arg}" --workdir="$workdir" --config.data.npz="$npz" \
      --config.progress_bar=False
  LAST_COMMAND=$command
}

report() {  # config name, workdir, command(s)
  $PYTHON experiments/repro_report.py --config="experiments/configs/$1.py" --workdir="$2" \
      --out="experiments/results/$1" --command="$3"
}

case "${1:-}" in
  takd)
    run repro_takd_cifar10_cnn runs/repro_takd_cifar10_cnn "$CIFAR10_NPZ"
    report repro_takd_cifar10_cnn runs/repro_takd_cifar10_cnn "$LAST_COMMAND" ;;
  noisy)  # the learning-rate sweep's stages are part of the config; `:sweep` ran them alone once.
    run repro_noisy_mnist runs/repro_noisy_mnist "$MNIST_NPZ"
    report repro_noisy_mnist runs/repro_noisy_mnist "$LAST_COMMAND" ;;
  generations)
    run repro_generations_cifar10 runs/repro_generations_cifar10 "$CIFAR10_NPZ"
    report repro_generations_cifar10 runs/repro_generations_cifar10 "$LAST_COMMAND" ;;
  mate)
    run repro_mate_cifar10 runs/repro_mate_cifar10 "$CIFAR10_NPZ"
    report repro_mate_cifar10 runs/repro_mate_cifar10 "$LAST_COMMAND" ;;
  *)
    echo "usage: bash experiments/reproduce.sh takd|noisy|generations|mate" >&2
    exit 2 ;;
esac
