"""A run's folder: the recorded config that guards it, and each stage's `metrics.jsonl`.

  WORKDIR/config.json                 the config the run was started with (current layout)
  WORKDIR/stages/<name>/checkpoints/  Orbax checkpoints (`kdjax.checkpoints`)
  WORKDIR/stages/<name>/metrics.jsonl one line per finished epoch
  WORKDIR/stages/<name>/tensorboard/  the same epochs as TensorBoard scalars (`kdjax.tensorboard`)
"""

import json
import os
import shutil
from typing import List

import jax
import ml_collections

from kdjax import config_layout
from kdjax import parallel
from kdjax import report
from kdjax.errors import KdjaxError


def stage_dir(workdir: str, name: str) -> str:
  return os.path.join(workdir, 'stages', name)


def metrics_path(workdir: str, name: str) -> str:
  return os.path.join(stage_dir(workdir, name), 'metrics.jsonl')


def read_metrics(path: str) -> List[dict]:
  """A stage's `metrics.jsonl`: one dict per finished epoch; `[]` if the file does not exist."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def append_metrics(path: str, summary: dict) -> None:
  """Adds an epoch's line (process 0 writes; the others computed the same values)."""
  if parallel.is_primary():
    with open(path, 'a') as f:
      f.write(json.dumps(summary) + '\n')


def resumed_metrics(path: str, completed_epochs: int) -> List[dict]:
  """The epochs a restored checkpoint covers: later lines are dropped from the file (process 0),
  so a resumed run neither repeats nor loses an epoch, and returned (every process)."""
  kept = [m for m in read_metrics(path) if m['epoch'] <= completed_epochs]
  if parallel.is_primary():
    with open(path, 'w') as f:
      f.writelines(json.dumps(m) + '\n' for m in kept)
  return kept


def sync_processes(name: str) -> None:
  """Waits until every process reaches this point (nothing to wait for with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def experiment_json(config) -> str:
  """The config as recorded in `config.json` (display-only settings left out)."""
  settings = config.to_dict()
  for key in config_layout.RUNTIME_ONLY_KEYS:
    settings.pop(key, None)
  return ml_collections.ConfigDict(settings).to_json_best_effort(indent=2, sort_keys=True)


def same_experiment(recorded_json: str, wanted_json: str) -> bool:
  """Whether two recorded configs compute the same run (`config_layout.effective_settings`)."""
  try:
    recorded = json.loads(recorded_json)
    return (config_layout.effective_settings(recorded)
            == config_layout.effective_settings(json.loads(wanted_json)))
  except (ValueError, KeyError, TypeError, AttributeError, KdjaxError):
    return False  # an unreadable record is not this experiment.


def claim(config, workdir: str, overwrite: bool) -> None:
  """Records the config in `workdir`; refuses a different experiment unless `overwrite`.

  A record that differs only in how it is written (the earlier config layout, defaults written
  out or left implicit, a setting no stage uses) is the same experiment: the run continues and
  the record is brought up to date. With several processes every one reads and judges the
  record, and process 0 alone writes (or deletes, with `overwrite`) once all have read it.
  """
  path = os.path.join(workdir, 'config.json')
  wanted = experiment_json(config)
  existing = None
  if os.path.exists(path):
    with open(path) as f:
      existing = f.read()
  same = existing is None or existing == wanted or same_experiment(existing, wanted)
  if existing is not None and existing != wanted and same:
    layout1 = config_layout.is_layout1(json.loads(existing))
    print(f'{workdir}: recorded '
          + ('in the earlier config layout (one `kd` block)' if layout1 else 'differently')
          + '; it computes the same run as this config, so the run continues (config.json '
          'rewritten in the current layout).')
  if not same and not overwrite:
    raise KdjaxError(
        f"'{workdir}' holds a run of a different config (see its config.json); kdjax will not "
        'mix two experiments in one folder. Use another --workdir, re-run with the original '
        'config to resume, or pass --overwrite to delete that run and start this one.')
  sync_processes('kdjax: workdir checked')
  if parallel.is_primary():
    if not same:
      _delete_run(workdir)
    os.makedirs(workdir, exist_ok=True)
    with open(path, 'w') as f:
      f.write(wanted)
  sync_processes('kdjax: workdir claimed')


def _delete_run(workdir: str) -> None:
  """--overwrite: what an earlier run of another config left in `workdir`."""
  print(f'--overwrite: deleting the earlier run in {workdir}.')
  for entry in ('stages', *report.OUTPUT_FILES):
    target = os.path.join(workdir, entry)
    if os.path.isdir(target):
      shutil.rmtree(target)
    elif os.path.exists(target):
      os.remove(target)
