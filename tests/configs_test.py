"""Every shipped config loads, validates, and describes the chain its docstring promises."""

import importlib

import pytest

from kdjax import config_layout
from kdjax import plan
from kdjax.errors import KdjaxError

# The image shapes and sizes of the datasets the configs name (nothing is loaded).
DATA = {'digits': ((8, 8, 1), 1438), 'mnist': ((28, 28, 1), 60000)}


def checked_order(config):
  """The stage order `plan` gives: every stage and value checked against the config's data."""
  shape, num_train = DATA.get(config.data.name, ((32, 32, 3), 50000))
  num_train = config.data.get('train_size', 0) or num_train - config.data.validation_size
  info = plan.DataInfo(config.data.name, num_train, 10, shape, config.data.validation_size > 0)
  return [p.name for p in plan.plan(config, info)]


def settings(config, name):
  return config_layout.stage_settings(config, name)


@pytest.mark.parametrize('name,teacher,assistant,student', [
    ('takd_default', 'plain_cnn_6', 'plain_cnn_4', 'plain_cnn_2'),
    ('takd_cifar10_cnn', 'plain_cnn_10', 'plain_cnn_4', 'plain_cnn_2'),
    ('takd_cifar10_resnet', 'resnet110', 'resnet20', 'resnet8'),
])
def test_takd_configs(name, teacher, assistant, student):
  config = importlib.import_module(f'experiments.configs.{name}').get_config()
  order = checked_order(config)
  assert order == ['teacher', 'assistant', 'nokd', 'blkd', 'takd']
  stages = config.stages
  assert (stages.teacher.model, stages.assistant.model, stages.takd.model) == (
      teacher, assistant, student)
  assert stages.takd.teacher == 'assistant' and stages.blkd.teacher == 'teacher'
  assert stages.nokd.loss == 'ce' and not stages.nokd.teacher


def test_default_job_is_a_label_scarce_chain_compared_seed_by_seed():
  from experiments.configs import default
  config = default.get_config()
  order = checked_order(config)
  assert order == ['teacher', 'assistant', 'nokd', 'blkd', 'takd']
  assert config.report.baseline in order  # the table's paired column names a stage,
  students = [n for n in order if config.stages[n].model == default.STUDENT]
  assert config.report.baseline in students and len(students) == 3
  assert {settings(config, n).num_replicas for n in students} == {10}  # on shared seeds.
  # Chosen on validation: a held-out split beside the label-scarce training split.
  assert config.data.validation_size == 400 and config.data.train_size == 400
  assert 'train_size' not in importlib.import_module(
      'experiments.configs.takd_default').get_config().data  # recorded configs keep their keys.


def test_a_teacher_cycle_is_refused():
  config = importlib.import_module('experiments.configs.takd_default').get_config()
  config.stage_order = ()
  config.stages.teacher.loss = 'kd'
  config.stages.teacher.teacher = 'assistant'
  with pytest.raises(KdjaxError, match='cycle'):
    checked_order(config)


def test_per_stage_overrides_apply_and_unknown_ones_are_refused():
  config = importlib.import_module('experiments.configs.takd_default').get_config()
  config.stages.takd.train.epochs = 3
  assert settings(config, 'takd').train.epochs == 3
  assert settings(config, 'blkd').train.epochs == config.train.epochs
  config.stages.takd.train.epoch = 3
  with pytest.raises(KdjaxError, match="unknown train setting 'epoch'"):
    settings(config, 'takd')
  config.stages.takd.train = {}
  config.stages.takd.loss_kw.temperature = 2.0  # a stage's loss settings over config.losses.
  assert settings(config, 'takd').loss_kw.temperature == 2.0
  assert settings(config, 'blkd').loss_kw.temperature == config.losses.kd.temperature == 4.0
  assert settings(config, 'takd').loss_kw.kd_weight == config.losses.kd.kd_weight


def test_generations_config_is_three_d_eta_lambda_runs():
  config = importlib.import_module('experiments.configs.generations_default').get_config()
  order = checked_order(config)
  assert len(order) == 11 and order[0] == 'strict_g0'
  stage = lambda name: settings(config, name)
  assert stage('strict_g0').loss_kw.eta == 1.0 and stage('tolerant_g0').loss_kw.eta == 0.6
  assert stage('baseline_g3').loss == 'ce' and not stage('baseline_g3').teachers
  assert (stage('born_again_g1').teachers.to_dict() == {'strict_g0': 1.0}
          and stage('born_again_g1').loss_kw.kd_weight == 0.5)
  assert (stage('tolerant_g3').teachers.to_dict() == {'tolerant_g2': 1.0}
          and stage('tolerant_g3').loss_kw.kd_weight == 0.6)
  assert all(stage(n).loss_kw.temperature == 1.0 for n in order if stage(n).loss == 'kd')
  assert {stage(n).model for n in order} == {'plain_cnn_4'}
  cifar = importlib.import_module('experiments.configs.generations_cifar10').get_config()
  assert len(checked_order(cifar)) == 11


def test_noisy_configs_cover_the_alpha_sigma_grid():
  for name, teacher in (('noisy_default', 'plain_cnn_6'), ('noisy_mnist', 'lenet5')):
    config = importlib.import_module(f'experiments.configs.{name}').get_config()
    order = checked_order(config)
    grid = {(settings(config, n).loss_kw.noise_alpha,
             settings(config, n).loss_kw.noise_sigma)
            for n in order if config.stages[n].loss == 'noisy_l2'}
    assert grid == {(0.0, 0.0)} | {(a, s) for a in (0.2, 0.5, 0.8, 1.0) for s in (0.1, 0.5, 1.0)}
    assert config.stages.teacher.model == teacher and config.stages.alone.loss == 'ce'


def test_multi_exit_model_and_loss_must_match():
  config = importlib.import_module('experiments.configs.mate_default').get_config()
  assert checked_order(config) == ['exits_ce', 'byot', 'exit_ensemble', 'mate']
  config.stages.mate.model = 'resnet8'
  with pytest.raises(KdjaxError, match='do not fit'):
    checked_order(config)
  config = importlib.import_module('experiments.configs.takd_default').get_config()
  config.stages.teacher.model = 'multi_exit_resnet8'
  with pytest.raises(KdjaxError, match='multi-exit|do not fit'):
    checked_order(config)
  cifar = importlib.import_module('experiments.configs.mate_cifar10').get_config()
  assert {s.model for s in cifar.stages.values()} == {'multi_exit_resnet20'}


def test_takd_reproduction_config_follows_the_protocol():
  from experiments.configs import repro_takd_cifar10_cnn
  config = repro_takd_cifar10_cnn.get_config()
  order = checked_order(config)
  assert config.data.validation_size == 5000
  students = [n for n in order if config.stages[n].model == 'plain_cnn_2']
  assert len(students) == 6  # NOKD, BLKD, three TAKD, the path's end.
  assert all(settings(config, n).num_replicas >= 3 for n in students)
  assert not config.data.augment.enabled  # TAKD's setting; the teacher's logits are cached.

  def path_to_teacher(name):
    models = [config.stages[name].model]
    while config.stages[name].teacher:
      name = config.stages[name].teacher
      models.append(config.stages[name].model)
    return [int(m.rsplit('_', 1)[1]) for m in models]

  assert path_to_teacher('path_2') == [2, 4, 6, 8, 10]
  assert path_to_teacher('blkd') == [2, 10] and path_to_teacher('nokd') == [2]
  assert {path_to_teacher(f'takd_via_ta{d}')[1] for d in (8, 6, 4)} == {8, 6, 4}
  assert order.index('teacher') == 0 and len(order) == 12


@pytest.mark.parametrize('name', ['repro_takd_cifar10_cnn', 'repro_noisy_mnist',
                                  'repro_generations_cifar10', 'repro_mate_cifar10'])
def test_reproduction_configs_follow_the_protocol(name):
  module = importlib.import_module(f'experiments.configs.{name}')
  config = module.get_config()
  order = checked_order(config)  # every stage and value checks out.
  assert config.data.validation_size == 5000
  replicas = {n: settings(config, n).num_replicas for n in order}
  assert sum(r >= 3 for r in replicas.values()) >= len(order) - 6  # teachers may train once.
  if not hasattr(module, 'paper'):
    return
  claimed = set()

  def names(spec):
    if isinstance(spec, str):
      return {spec.split('@')[0]}
    if 'gain' in spec:
      return set(spec['gain'][:2])
    return set(spec['best_on_val'])

  for _, pairs in module.paper()['claims']:
    for better, worse in pairs:
      claimed |= names(better) | names(worse)
  assert claimed <= set(order), claimed - set(order)
  for stage in claimed:  # every compared row has seeds to pair.
    assert replicas[stage] >= 3, stage


def _table_cells(markdown, prefix):
  """A Markdown table's rows that start with `prefix`, as {first cell: the other cells}."""
  return {line.split('|')[1].strip(): [cell.strip() for cell in line.split('|')[2:-1]]
          for line in markdown.splitlines() if line.startswith(prefix)}


def test_generations_reproduction_tabulates_each_lineage_by_generation():
  module = importlib.import_module('experiments.configs.repro_generations_cifar10')
  names = checked_order(module.get_config())
  # Stage i's three lineages score i/100, i/100 + 0.01, i/100 + 0.02: mean i + 1, std 1 (points).
  rows = {name: {'test': [i / 100, i / 100 + 0.01, i / 100 + 0.02], 'train_accuracy': 0.5}
          for i, name in enumerate(names)}
  cell = lambda name: f'{names.index(name) + 1:.2f} ± 1.00'
  lines = _table_cells(module.extra_markdown(rows), '| D(')
  assert lines == {
      'D(1.0, 0.0): from scratch': [cell('strict_g0'), *['not trained (= generation 0)'] * 2],
      'D(1.0, 0.5): born-again': [cell('strict_g0'), cell('born_again_g1'), 'not trained'],
      'D(0.6, 0.6): tolerant': [cell('tolerant_g0'), cell('tolerant_g1'), cell('tolerant_g2')]}


def test_takd_reproduction_tabulates_the_student_by_its_teacher():
  module = importlib.import_module('experiments.configs.repro_takd_cifar10_cnn')
  names = checked_order(module.get_config())
  # Stage i scores i/100 (points i) on each of its seeds; BLKD's seeds differ by ±1 point.
  rows = {name: {'test': [names.index(name) / 100] * 3} for name in names}
  rows['blkd'] = {'test': [names.index('blkd') / 100 + d for d in (-0.01, 0.0, 0.01)]}
  lines = _table_cells(module.extra_markdown(rows), '| ')
  points = lambda name: names.index(name)
  blkd = points('blkd')
  assert lines['nothing (NOKD)'] == ['—', f"{points('nokd'):.2f} ± 0.00",
                                     f"{points('nokd') - blkd:+.2f}"]
  assert lines['CNN-10 teacher (BLKD)'] == [f"{points('teacher'):.2f}", f'{blkd:.2f} ± 1.00',
                                            '+0.00']
  assert lines['TA CNN-6'] == [f"{points('ta6'):.2f}", f"{points('takd_via_ta6'):.2f} ± 0.00",
                               f"{points('takd_via_ta6') - blkd:+.2f}"]
  assert lines['CNN-4 at the end of 10 → 8 → 6 → 4'][:2] == [f"{points('path_4'):.2f}",
                                                             f"{points('path_2'):.2f} ± 0.00"]
