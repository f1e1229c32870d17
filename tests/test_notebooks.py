"""Executes the notebooks on the CPU; a failing cell (each notebook asserts what it shows)
fails the test.

A notebook's cell tagged "parameters" holds its knobs; ``SUITE_PARAMETERS`` overrides some
here (a cell injected after it, as papermill does) to keep the suite's time small, with
values under which the notebook's assertions still hold (seeded, so the run is the same
every time). Measured on the shared 2-core CPU (load average 4-6 from other work), warm
compilation cache: 02_lora_finetune 3.5-6 min wall, ~200 CPU-seconds, 80% of it the
training (its 30 steps cut to 20 here); 03_benchmarks ~8 s (it only reads JSON)."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))

SUITE_PARAMETERS = {
    "02_lora_finetune.ipynb": {"STEPS": 20},
}


def with_parameters(nb, values: dict):
    """``nb`` with a cell setting ``values`` right after its "parameters" cell."""
    index = next(i for i, cell in enumerate(nb.cells) if "parameters" in cell.get("metadata", {}).get("tags", []))
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(f"# injected by tests/test_notebooks.py\n{source}"))
    return nb


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path):
    nb = nbformat.read(path, as_version=4)
    if path.name in SUITE_PARAMETERS:
        nb = with_parameters(nb, SUITE_PARAMETERS[path.name])
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
