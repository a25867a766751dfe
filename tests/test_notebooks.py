"""Every notebook in notebooks/ runs top to bottom headless (nbclient, small settings through
ADJAX_NOTEBOOK_SMALL=1) and is stored without outputs."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(f for f in os.listdir(os.path.join(ROOT, "notebooks")) if f.endswith(".ipynb"))


def test_the_three_notebooks_exist():
  assert NOTEBOOKS == ["custom_data.ipynb", "paper_tables.ipynb", "quickstart.ipynb"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, monkeypatch, tmp_path):
  path = os.path.join(ROOT, "notebooks", name)
  notebook = nbformat.read(path, as_version=4)
  code = [c for c in notebook.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code), f"{name} is stored with outputs"
  monkeypatch.setenv("ADJAX_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks' tempfile folders go where pytest clears them
  NotebookClient(notebook, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}}).execute()
  outputs = [o for c in code for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  assert outputs, f"{name} printed nothing"
