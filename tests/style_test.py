"""The shape of the code a newcomer reads: short functions, a stage's loop on one screen."""

import ast
import glob
import os

from conftest import REPO


def function_lengths():
  for path in glob.glob(os.path.join(REPO, 'kdjax', '**', '*.py'), recursive=True):
    with open(path) as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        yield os.path.relpath(path, REPO), node.name, node.end_lineno - node.lineno + 1


def test_no_function_in_kdjax_is_longer_than_100_lines():
  long = [(path, name, lines) for path, name, lines in function_lengths() if lines > 100]
  assert long == []


def test_a_stages_loop_fits_on_one_screen():
  lengths = {name: lines for path, name, lines in function_lengths()
             if path == os.path.join('kdjax', 'experiment.py')}
  assert lengths['run_stage'] <= 80


def test_the_package_never_imports_experiments_or_the_shared_data():
  for path in glob.glob(os.path.join(REPO, 'kdjax', '**', '*.py'), recursive=True):
    with open(path) as f:
      source = f.read()
    assert 'import experiments' not in source and 'from experiments' not in source, path
    assert 'shared/data' not in source, path
