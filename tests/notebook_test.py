"""The notebooks in experiments/notebooks: in step with their `# %%` twins, committed without
outputs, and executed end to end in a Jupyter kernel of this interpreter."""

import glob
import os

import pytest

from conftest import REPO

nbclient = pytest.importorskip('nbclient')  # the `notebook` extra (part of `test`).
jupytext = pytest.importorskip('jupytext')
import nbformat  # noqa: E402  (installed with nbclient)
from ipykernel.kernelspec import write_kernel_spec  # noqa: E402

NOTEBOOKS = os.path.join(REPO, 'experiments', 'notebooks')
COMPOSE_LOSSES = os.path.join(NOTEBOOKS, 'compose_losses.ipynb')


def cells(path):
  return [(cell.cell_type, cell.source) for cell in jupytext.read(path).cells]


@pytest.mark.parametrize('notebook', sorted(glob.glob(os.path.join(NOTEBOOKS, '*.ipynb'))),
                         ids=os.path.basename)
def test_each_notebook_is_in_step_with_its_twin_and_has_no_outputs(notebook):
  twin = notebook[:-len('.ipynb')] + '.py'
  assert cells(notebook) == cells(twin), (
      f'{notebook} and {twin} differ; run `jupytext --sync {os.path.relpath(twin, REPO)}` '
      '(the newer file wins) and commit both')
  saved = nbformat.read(notebook, as_version=4)
  assert saved.metadata.jupytext.formats == 'ipynb,py:percent'
  code = [cell for cell in saved.cells if cell.cell_type == 'code']
  assert code and all(c.outputs == [] and c.execution_count is None for c in code), (
      f'{notebook} was committed with outputs; clear them (`jupytext --sync` on the twin, or '
      "Jupyter's Clear All Outputs) before committing")


def test_compose_losses_notebook_runs_and_shows_the_table_and_the_plot(tmp_path, monkeypatch):
  # A kernelspec for exactly this interpreter (`sys.executable`), found first on JUPYTER_PATH:
  # a `python3` spec of another environment must not answer instead.
  write_kernel_spec(tmp_path / 'kernels' / 'kdjax-test')
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path))
  notebook = nbformat.read(COMPOSE_LOSSES, as_version=4)
  # The kernel starts in the notebook's folder, as Jupyter starts it; the notebook finds the
  # repository from there.
  client = nbclient.NotebookClient(notebook, kernel_name='kdjax-test', timeout=240,
                                   resources={'metadata': {'path': NOTEBOOKS}})
  client.execute()  # raises CellExecutionError, with the cell and traceback, if a cell fails.

  outputs = [output for cell in notebook.cells if cell.cell_type == 'code'
             for output in cell.outputs]
  assert not [o for o in outputs if o.output_type == 'error']
  shown = [o.data for o in outputs if o.output_type in ('display_data', 'execute_result')]
  tables = [data['text/markdown'] for data in shown if 'text/markdown' in data]
  assert len(tables) == 1 and '| student' in tables[0] and 'test accuracy (%)' in tables[0]
  assert any('image/png' in data for data in shown)
  printed = ''.join(o.text for o in outputs if o.output_type == 'stream')
  assert 'closed form and finite differences agree' in printed
