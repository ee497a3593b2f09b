"""The config's layout: how a stage's effective settings are read from it, and the earlier layout.

A config (an `ml_collections.ConfigDict`, see `experiments/configs/takd_default.py`) has global
blocks and `stages`:

  seed, data, train, model      as in flax's examples (`train` is every stage's default)
  losses.<loss name>            that loss's settings, shared by every stage that uses it
  teacher_source                how teachers run: `replica` ('first' | 'matching'),
                                `cache_logits` (bool), `dtype` ('float32' | 'bfloat16'),
                                `cache_dtype` ('float32' | 'float16', a file's logits),
                                `cache_top_k` (0, or the k largest logits kept in a file)
  num_replicas                  students trained at once per stage (a stage may set its own)
  stages.<name>                 model, loss, loss_kw, teacher | teachers, num_replicas, train,
                                teacher_source (the last three override the global blocks)
  external_teachers.<name>      a teacher trained elsewhere (absent: none): `path` (a PyTorch
                                or safetensors file), `model` (kdjax's name for the network),
                                `layout` ('takd' | 'repdistiller'; see `kdjax.torch_import`)

A stage's loss is named with its own settings, in big_vision's manner: `loss = 'kd'`,
`loss_kw = {'temperature': 2.0}` over `losses.kd` over the loss's defaults
(`kdjax.stage_losses`). `teacher` names one earlier stage or external teacher; `teachers =
{'teacher': 0.5, 'ta8': 0.5}` several, with weights.

Layout 1 (kdjax before the plan/run split) had one `kd` block of 16 keys that mixed every loss's
hyper-parameters with the teacher's execution settings. `upgrade_layout` reads it into this
layout, so that configs and recorded runs written for it keep working.
"""

import copy
import json
import os
from typing import Dict, List, Optional, Tuple

import ml_collections

from kdjax import stage_losses
from kdjax.errors import KdjaxError

STAGE_KEYS = ('model', 'loss', 'loss_kw', 'teacher', 'teachers', 'num_replicas', 'train',
              'teacher_source')
EXTERNAL_TEACHER_KEYS = ('path', 'model', 'layout')
TEACHER_SOURCE_DEFAULTS = {'replica': 'first', 'cache_logits': True, 'dtype': 'float32',
                           'cache_dtype': 'float32', 'cache_top_k': 0}
# Settings that change how a run is shown or guarded, not what it computes: left out of
# config.json, so changing one (to resume past a skipped-step failure, say) is the same run.
# (A dotted key names a setting inside a block: how the data reaches the device changes the
# students only to float rounding.)
RUNTIME_ONLY_KEYS = ('progress_bar', 'compilation_cache_dir', 'max_skipped_fraction',
                     'data.pipeline', 'data.device_budget_mb')
# Settings added since runs were first recorded, at the value that means "as before": a record
# without them is the same experiment.
NEUTRAL_DEFAULTS = {'data.npy_dir': '', 'data.augment.kind': 'pad_crop_flip',
                    'data.augment.size': 0, 'data.augment.draw': 'per_batch'}


def without_runtime_only(settings: dict) -> dict:
  """A copy of a config dict less `RUNTIME_ONLY_KEYS` and the `NEUTRAL_DEFAULTS` it holds at
  their neutral value."""
  settings = copy.deepcopy(settings)
  for key in (*RUNTIME_ONLY_KEYS, *NEUTRAL_DEFAULTS):
    *blocks, last = key.split('.')
    parent = settings
    for block in blocks:
      parent = parent.get(block) if isinstance(parent, dict) else None
    if isinstance(parent, dict) and last in parent and (
        key in RUNTIME_ONLY_KEYS or parent[last] == NEUTRAL_DEFAULTS[key]):
      del parent[last]
  return settings
# Layout 1's teacher settings in `kd`, by their name in `teacher_source`.
_LAYOUT1_TEACHER_KEYS = {'teacher_replica': 'replica', 'cache_teacher_logits': 'cache_logits',
                         'teacher_dtype': 'dtype'}


def is_layout1(settings) -> bool:
  return 'kd' in settings and 'losses' not in settings


def upgrade_layout(settings: dict) -> dict:
  """A layout-1 config dict (one `kd` block) in the current layout; other dicts unchanged.

  `kd`'s teacher keys become `teacher_source`; its other keys become every loss's `losses.<name>`
  block (each loss takes the keys it has: layout 1 applied them to every stage); a stage's `kd`
  overrides become its `teacher_source` and `loss_kw` (the keys its loss has; the others had no
  effect on it).
  """
  if not is_layout1(settings):
    return settings
  settings = copy.deepcopy(settings)
  kd = settings.pop('kd') or {}
  settings['teacher_source'] = {new: kd[old] for old, new in _LAYOUT1_TEACHER_KEYS.items()
                                if old in kd}
  settings['losses'] = {name: {k: kd[k] for k in stage_losses.default_settings(name) if k in kd}
                        for name in stage_losses.LOSSES}
  for stage in (settings.get('stages') or {}).values():
    overrides = stage.pop('kd', None) or {}
    stage['teacher_source'] = {new: overrides[old] for old, new in _LAYOUT1_TEACHER_KEYS.items()
                               if old in overrides}
    own = (stage_losses.default_settings(stage['loss'])
           if stage.get('loss') in stage_losses.LOSSES else {})
    stage['loss_kw'] = {k: v for k, v in overrides.items() if k in own}
    stage.setdefault('teachers', {})
  return settings


def stage_settings(config, name: str) -> ml_collections.ConfigDict:
  """The stage's effective settings: every global default with the stage's overrides applied.

  Returns `{name, model, loss, loss_kw, teachers: {stage: weight}, num_replicas (>= 1), train,
  teacher_source}`; `loss_kw` is complete (the loss's defaults, `losses.<loss>`, `loss_kw`).
  """
  stage = config.stages[name]
  merged = ml_collections.ConfigDict()
  merged.name = name
  merged.model = stage.get('model')
  merged.loss = stage.get('loss')
  merged.teachers = _teacher_weights(stage, name)
  # 0 or absent: config.num_replicas. A teacher trained once under students trained N times
  # saves N − 1 teacher trainings when only the students' spread is reported.
  merged.num_replicas = stage.get('num_replicas') or config.get('num_replicas')
  merged.train = _merged(config.get('train') or {}, stage.get('train'), name, 'train')
  merged.teacher_source = _merged({**TEACHER_SOURCE_DEFAULTS,
                                   **dict(config.get('teacher_source') or {})},
                                  stage.get('teacher_source'), name, 'teacher_source')
  loss_kw = {}
  if merged.loss in stage_losses.LOSSES:
    shared = dict((config.get('losses') or {}).get(merged.loss) or {})
    loss_kw = {**stage_losses.default_settings(merged.loss), **shared,
               **dict(stage.get('loss_kw') or {})}
  merged.loss_kw = ml_collections.ConfigDict(loss_kw)
  return merged


def _teacher_weights(stage, name: str) -> Dict[str, float]:
  one, several = stage.get('teacher') or '', dict(stage.get('teachers') or {})
  if one and several:
    raise KdjaxError(f"stage '{name}' sets both teacher '{one}' and teachers {several}; name one "
                     'teacher with `teacher`, or several with weights in `teachers`.')
  return {one: 1.0} if one else several


def _merged(defaults, overrides, name: str, block: str) -> ml_collections.ConfigDict:
  merged = ml_collections.ConfigDict(dict(defaults))
  for key, value in dict(overrides or {}).items():
    if key not in merged:
      raise KdjaxError(f"stage '{name}': unknown {block} setting '{key}'; valid ones are: "
                       f"{', '.join(sorted(merged.keys()))}.")
    merged[key] = value
  return merged


def effective_settings(config) -> dict:
  """What a run computes, as a plain dict: two configs that compute the same run give equal dicts.

  Global `losses`, `teacher_source`, `num_replicas` and `train` are folded into each stage's
  effective settings (`stage_settings`), so a setting no stage uses does not count, and a setting
  written out at its default counts the same as one left out. Display-only keys are dropped.
  """
  settings = without_runtime_only(upgrade_layout(_as_dict(config)))
  config = ml_collections.ConfigDict(settings)
  folded = ('stages', 'losses', 'teacher_source', 'num_replicas', 'train', 'external_teachers')
  result = {k: v for k, v in settings.items() if k not in folded}
  result['stages'] = {name: stage_settings(config, name).to_dict()
                      for name in (settings.get('stages') or {})}
  used = {t for stage in result['stages'].values() for t in stage['teachers']}
  external = {name: block for name, block in (settings.get('external_teachers') or {}).items()
              if name in used}
  if external:  # absent when none is used, so records from before the block compare equal.
    result['external_teachers'] = external
  return json.loads(json.dumps(result))  # tuples as lists, as config.json records them.


def _as_dict(config) -> dict:
  if isinstance(config, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
    return json.loads(config.to_json_best_effort())
  return copy.deepcopy(config)


def stage_names(config) -> List[str]:
  return list((config.get('stages') or {}).keys())


def workdir_reference(teacher: str) -> Optional[Tuple[str, str]]:
  """`('/path/to/workdir', 'stage')` for a teacher named `'/path/to/workdir:stage'` (a finished
  stage of another kdjax run: a path with a folder separator, a colon, the stage's name), else
  None."""
  path, colon, stage = teacher.rpartition(':')
  if colon and stage and ('/' in path or path.startswith(('.', '~'))):
    return os.path.expanduser(path), stage
  return None


def external_teacher_names(config) -> List[str]:
  return list((config.get('external_teachers') or {}).keys())
