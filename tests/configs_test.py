"""Every shipped config loads, validates, and describes the chain its docstring promises."""

import importlib

import pytest

from kdjax import experiment


@pytest.mark.parametrize('name,teacher,assistant,student', [
    ('takd_default', 'plain_cnn_6', 'plain_cnn_4', 'plain_cnn_2'),
    ('takd_cifar10_cnn', 'plain_cnn_10', 'plain_cnn_4', 'plain_cnn_2'),
    ('takd_cifar10_resnet', 'resnet110', 'resnet20', 'resnet8'),
])
def test_takd_configs(name, teacher, assistant, student):
  config = importlib.import_module(f'experiments.configs.{name}').get_config()
  order = experiment.stage_order(config)
  assert order == ['teacher', 'assistant', 'nokd', 'blkd', 'takd']
  stages = config.stages
  assert (stages.teacher.model, stages.assistant.model, stages.takd.model) == (
      teacher, assistant, student)
  assert stages.takd.teacher == 'assistant' and stages.blkd.teacher == 'teacher'
  assert stages.nokd.loss == 'ce' and not stages.nokd.teacher


def test_a_teacher_cycle_is_refused():
  config = importlib.import_module('experiments.configs.takd_default').get_config()
  config.stage_order = ()
  config.stages.teacher.loss = 'kd'
  config.stages.teacher.teacher = 'assistant'
  with pytest.raises(experiment.KdjaxError, match='cycle'):
    experiment.stage_order(config)


def test_per_stage_overrides_apply_and_unknown_ones_are_refused():
  config = importlib.import_module('experiments.configs.takd_default').get_config()
  config.stages.takd.train.epochs = 3
  assert experiment.stage_config(config, 'takd').train.epochs == 3
  assert experiment.stage_config(config, 'blkd').train.epochs == config.train.epochs
  config.stages.takd.train.epoch = 3
  with pytest.raises(experiment.KdjaxError, match="unknown train setting 'epoch'"):
    experiment.stage_config(config, 'takd')
