"""The notebooks run top to bottom (nbclient, as a reader would run them), so they never rot."""
import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, 'notebooks', '*.ipynb')))


def test_there_are_notebooks():
    assert [os.path.basename(p) for p in NOTEBOOKS] == ['inference.ipynb']


@pytest.mark.parametrize('path', NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_top_to_bottom(path):
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name='python3',
                   resources={'metadata': {'path': os.path.dirname(path)}}).execute()  # raises on a failing cell
    outputs = [o for cell in notebook.cells if cell.cell_type == 'code' for o in cell.outputs]
    assert not [o for o in outputs if o.get('output_type') == 'error']
    assert sum('image/png' in o.get('data', {}) for o in outputs) == 4  # the four pictures were drawn
    assert any('largest difference to PyTorch' in o.get('text', '') for o in outputs)
