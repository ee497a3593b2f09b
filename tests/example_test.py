"""The notebook-style example in experiments/ runs and its hand-composed loss trains a student."""

import runpy

from conftest import REPO


def test_compose_losses_example_runs_and_learns():
  namespace = runpy.run_path(f'{REPO}/experiments/compose_losses.py')
  result = namespace['main'](steps=60)
  assert result['last_loss'] < result['first_loss']
  assert result['teacher_accuracy'] > 0.5 and result['student_accuracy'] > 0.5  # chance: 0.1.
