"""`plan`: a config resolved into frozen stage plans, with no compile and no writes; the layout."""

import dataclasses
import json
import os

import jax
import pytest

from conftest import REPO
from experiments.configs import takd_default
from kdjax import config_layout
from kdjax import plan
from kdjax import stage_losses
from kdjax.errors import KdjaxError

DIGITS = plan.DataInfo('digits', 1438, 10, (8, 8, 1))


def test_the_default_config_plans_every_stage_in_order():
  plans = plan.plan(takd_default.get_config(), DIGITS)
  assert [p.name for p in plans] == ['teacher', 'assistant', 'nokd', 'blkd', 'takd']
  by_name = {p.name: p for p in plans}
  assert isinstance(by_name['blkd'].loss, stage_losses.LOSSES['kd'])
  assert (by_name['blkd'].loss.temperature, by_name['blkd'].loss.kd_weight) == (4.0, 0.9)
  assert isinstance(by_name['nokd'].loss, stage_losses.LOSSES['ce'])
  assert by_name['takd'].teacher.names == 'assistant' and by_name['nokd'].teacher.names == ''
  # Augmentation is off in the default, so every teacher's logits are cached.
  assert all(p.teacher.cache_logits for p in plans if p.teacher.teachers)
  assert by_name['teacher'].train.steps_per_epoch == 1438 // 64
  assert by_name['teacher'].train.total_steps == 12 * (1438 // 64)
  assert all(p.num_replicas == 1 and p.replica_axis is None for p in plans)
  assert all(p.evaluators == ('test',) for p in plans)
  with pytest.raises(dataclasses.FrozenInstanceError):
    plans[0].num_replicas = 2


def test_settings_resolve_stage_over_losses_over_the_loss_defaults():
  config = takd_default.get_config()
  config.losses.kd.temperature = 2.0
  config.stages.takd.loss_kw.kd_weight = 0.5
  config.stages.blkd.teacher_source.dtype = 'bfloat16'
  config.data.augment.enabled = True
  config.num_replicas = 3
  config.stages.teacher.num_replicas = 1
  by_name = {p.name: p for p in plan.plan(config, DIGITS, backend='gpu')}
  assert (by_name['takd'].loss.temperature, by_name['takd'].loss.kd_weight) == (2.0, 0.5)
  assert (by_name['blkd'].loss.temperature, by_name['blkd'].loss.kd_weight) == (2.0, 0.9)
  assert by_name['blkd'].teacher.teachers[0].model.dtype == jax.numpy.bfloat16
  assert by_name['takd'].teacher.teachers[0].model.dtype == jax.numpy.float32
  assert not any(p.teacher.cache_logits for p in by_name.values())  # augmented views.
  assert by_name['teacher'].replica_axis is None and by_name['takd'].replica_axis == 3
  assert by_name['blkd'].teacher.teachers[0].num_replicas == 1
  assert by_name['takd'].seeds == [0, 1, 2]
  assert {p.replica_batching for p in by_name.values()} == {'vmap'}  # 'auto' off the CPU.
  assert {p.replica_batching for p in plan.plan(config, DIGITS)} == {'unroll'}
  validated = plan.plan(config, dataclasses.replace(DIGITS, has_validation=True))
  assert all(p.evaluators == ('test', 'validation') for p in validated)


def test_planning_compiles_nothing_and_writes_nothing(tmp_path, monkeypatch):
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, duration, **kw: compiles.append(event) if 'compile' in event else None)
  monkeypatch.chdir(tmp_path)
  config = takd_default.get_config()
  config.stages.teacher.model = 'resnet110'  # a big model: shapes only, never initialised.
  plan.plan(config, plan.DataInfo('cifar', 50000, 10, (32, 32, 3)))
  assert [e for e in compiles if 'backend_compile' in e] == []
  assert os.listdir(tmp_path) == []


def test_several_teachers_plan_an_ensemble_with_normalised_weights():
  config = takd_default.get_config()
  config.stages.takd.loss = 'multi_teacher_kd'
  config.stages.takd.teacher = ''
  config.stages.takd.teachers = {'teacher': 3.0, 'assistant': 1.0}
  takd = plan.plan(config, DIGITS)[-1]
  # In name order (a ConfigDict's), each weight with its teacher.
  assert takd.teacher.ensemble and takd.teacher.names == 'assistant+teacher'
  assert [t.weight for t in takd.teacher.teachers] == [1.0, 3.0]
  assert takd.loss.weights == pytest.approx((0.25, 0.75))


def test_a_users_module_by_import_path_is_planned():
  config = takd_default.get_config()
  config.stages.teacher.model = 'tests.user_models:TinyNet'
  teacher = plan.plan(config, DIGITS)[0]
  assert type(teacher.model).__name__ == 'TinyNet' and teacher.model.num_classes == 10
  config.stages.teacher.model = 'tests.user_models:NoSuchNet'
  with pytest.raises(KdjaxError, match="stage 'teacher': .*NoSuchNet"):
    plan.plan(config, DIGITS)


def test_the_earlier_layout_is_the_same_experiment_in_the_current_one():
  # config.json as kdjax recorded tests/configs/tiny_chain.py before this layout (one `kd` block).
  with open(os.path.join(REPO, 'tests/data/tiny_chain_layout1_config.json')) as f:
    recorded = json.load(f)
  assert config_layout.is_layout1(recorded)
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      'tiny_chain', os.path.join(REPO, 'tests/configs/tiny_chain.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  current = module.get_config()
  assert (config_layout.effective_settings(recorded)
          == config_layout.effective_settings(current))
  upgraded = config_layout.upgrade_layout(recorded)
  assert upgraded['teacher_source'] == {'replica': 'first', 'cache_logits': True,
                                        'dtype': 'float32'}
  assert upgraded['losses']['kd']['temperature'] == 4.0 and 'teachers' in upgraded['stages'][
      'student']
  # A value that differs is another experiment; one no stage uses is not.
  current.losses.kd.temperature = 2.0
  assert (config_layout.effective_settings(recorded)
          != config_layout.effective_settings(current))
  current.losses.kd.temperature = 4.0
  current.losses.noisy_l2.noise_alpha = 0.5
  assert (config_layout.effective_settings(recorded)
          == config_layout.effective_settings(current))


def test_a_layout1_stage_override_moves_to_its_loss_and_teacher_source():
  settings = {'kd': {'temperature': 4.0, 'kd_weight': 0.9, 'noise_alpha': 0.0,
                     'teacher_dtype': 'float32'},
              'stages': {'noisy': {'model': 'mlp_1x100', 'loss': 'noisy_l2', 'teacher': 't',
                                   'kd': {'noise_alpha': 0.5, 'teacher_dtype': 'bfloat16',
                                          'temperature': 9.0}}}}
  upgraded = config_layout.upgrade_layout(settings)
  stage = upgraded['stages']['noisy']
  assert stage['loss_kw'] == {'noise_alpha': 0.5}  # temperature: not a setting of noisy_l2.
  assert stage['teacher_source'] == {'dtype': 'bfloat16'}
  assert upgraded['losses']['noisy_l2'] == {'noise_alpha': 0.0}
  assert 'kd' in settings  # the input is left as it was.


def test_auto_batching_vmaps_many_students_on_cpu_and_says_so():
  # Unrolled students compile for minutes beyond a few dozen (over 200 s for 64 ResNet-8s);
  # 'auto' unrolls on CPU only up to UNROLL_AT_MOST and says when it does otherwise.
  config = takd_default.get_config()
  config.num_replicas = plan.UNROLL_AT_MOST
  assert {(p.replica_batching, p.batching_note) for p in plan.plan(config, DIGITS)
          if p.num_replicas > 1} == {('unroll', '')}
  config.num_replicas = 64
  many = [p for p in plan.plan(config, DIGITS) if p.num_replicas > 1]
  assert many and all(p.replica_batching == 'vmap' for p in many)
  assert all('64 students are vmapped on CPU' in p.batching_note for p in many)
  assert all(p.replica_batching == 'vmap' and not p.batching_note
             for p in plan.plan(config, DIGITS, backend='gpu') if p.num_replicas > 1)
  config.replica_batching = 'unroll'  # asked for: kept, with the cost stated.
  assert all(p.replica_batching == 'unroll' and 'a few minutes' in p.batching_note
             for p in plan.plan(config, DIGITS) if p.num_replicas > 1)


def test_each_stage_fingerprints_its_own_effective_settings():
  base = {p.name: p.settings_fingerprint for p in plan.plan(takd_default.get_config(), DIGITS)}
  assert len(set(base.values())) == len(base)  # every stage computes something of its own.
  config = takd_default.get_config()
  config.losses.kd.temperature = 2.0  # used by the kd stages only.
  changed = {p.name: p.settings_fingerprint for p in plan.plan(config, DIGITS)}
  assert {n for n in base if base[n] != changed[n]} == {'assistant', 'blkd', 'takd'}
  config = takd_default.get_config()
  config.progress_bar, config.max_skipped_fraction = False, 0.5  # run-time settings only.
  assert {p.name: p.settings_fingerprint for p in plan.plan(config, DIGITS)} == base
