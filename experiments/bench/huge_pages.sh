#!/usr/bin/env bash
# A/B of glibc malloc huge pages for `python -m kdjax.main` (see kdjax/main.py).
#
#   bash experiments/bench/huge_pages.sh [CIFAR10_NPZ]   # about 12 minutes on 2 idle cores
#
# Trains the generations reproduction's patriarch (three ResNet-8 students, augmentation on) for
# 3 epochs on the first 7,680 CIFAR-10 training images, four times in ABBA order: without huge
# pages (KDJAX_MALLOC_HUGE_PAGES=0), with, with, without. Prints the wall time, the seconds per
# step of epochs 2 and 3 (epoch 1 includes compilation) and the last test accuracies, which
# should be equal in all four runs. Stop other work on the machine first.
set -euo pipefail
cd "$(dirname "$0")/../.."
NPZ=${1:-/tmp/cifar10.npz}
PYTHON=${PYTHON:-python}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
$PYTHON - "$NPZ" "$TMP" <<'PY'
import sys
import numpy as np
data = np.load(sys.argv[1])
np.savez(f'{sys.argv[2]}/subset.npz', x_train=data['x_train'][:7680], y_train=data['y_train'][:7680],
         x_test=data['x_test'][::10], y_test=data['y_test'][::10])
PY
cat > "$TMP/patriarch.py" <<'PY'
from experiments.configs import repro_generations_cifar10


def get_config():
  config = repro_generations_cifar10.get_config()
  for name in list(config.stages.keys()):
    if name != 'strict_g0':
      del config.stages[name]
  config.stage_order = ('strict_g0',)
  config.train.epochs = 3
  config.data.validation_size = 0
  config.train.checkpoint_every_steps = 0
  return config
PY
for huge in 0 1 1 0; do
  run=$TMP/run_$RANDOM
  start=$(date +%s)
  PYTHONPATH=.:${PYTHONPATH:-} KDJAX_MALLOC_HUGE_PAGES=$huge $PYTHON -m kdjax.main \
      --config="$TMP/patriarch.py" --workdir="$run" --config.data.npz="$TMP/subset.npz" \
      --config.progress_bar=False > "$run.log" 2>&1 || { cat "$run.log"; exit 1; }
  wall=$(( $(date +%s) - start ))
  $PYTHON - "$run/stages/strict_g0/metrics.jsonl" "$huge" "$wall" <<'PY'
import json, sys
epochs = [json.loads(line) for line in open(sys.argv[1])]
steps = epochs[0]['step']
print(f'huge pages {sys.argv[2]}: wall {sys.argv[3]} s, s/step (epochs 2, 3)',
      [round(e['epoch_s'] / steps, 3) for e in epochs[1:]],
      'test accuracy', [round(a, 4) for a in epochs[-1]['test_accuracy']])
PY
done
