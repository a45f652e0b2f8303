"""The quickstart notebook runs top to bottom (with tiny budgets), so it never rots."""
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path("notebooks/quickstart.ipynb")
TINY = """ITERATIONS = 3
MINUTES = 0
WARM_START_ITERATIONS = 0
EVAL_N = 200
TEACHER_NFE = 2
OUT = {out!r}"""


def test_quickstart_notebook_executes(tmp_path):
    pytest.importorskip("ipykernel")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, "the notebook needs exactly one cell tagged `parameters`"
    names = {line.split("=")[0].strip() for line in params[0].source.splitlines() if "=" in line}
    assert names == {line.split("=")[0].strip() for line in TINY.splitlines()}, "update TINY with the notebook"
    params[0].source = TINY.format(out=str(tmp_path / "run"))
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": "."}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "student / teacher" in text and "max |exported - run|" in text
    assert (tmp_path / "run" / "export" / "unet" / "config.json").exists()
