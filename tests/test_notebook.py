"""examples/quickstart.ipynb runs as users run it: every cell executed by a real Jupyter kernel
(nbclient, the python3 kernel of this environment) on the tiny backbone, offline."""

import pytest
from helpers import ROOT

nbformat = pytest.importorskip("nbformat", reason='needs the dev extra: pip install -e ".[dev]"')
nbclient = pytest.importorskip("nbclient", reason='needs the dev extra: pip install -e ".[dev]"')
pytest.importorskip("ipykernel", reason='needs the dev extra: pip install -e ".[dev]"')

NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"

# A kernel start and the imports in it take most of its ~6 s on 2 cores.
pytestmark = pytest.mark.slow


def _outputs(cell) -> list:
    return cell.get("outputs", [])


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the kernel inherits the environment
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not _outputs(cell) for cell in notebook.cells), "commit the notebook unexecuted"
    parameters = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    assert 'BACKBONE = "tiny"' in parameters.source

    client = nbclient.NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=120,
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    client.execute()

    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    errors = [o for cell in code for o in _outputs(cell) if o.output_type == "error"]
    assert not errors
    streams = [o for cell in code for o in _outputs(cell) if o.output_type == "stream"]
    text = "".join(o.text for o in streams if o.name == "stdout")
    warnings = "".join(o.text for o in streams if o.name == "stderr")
    assert str(ROOT / "spar") not in warnings  # third-party notices only (e.g. tqdm's)
    assert "tiny on cpu" in text and "mean cosine student-teacher" in text
    assert "ms, teacher" in text and "x the student" in text
    pictures = [o for cell in code for o in _outputs(cell) if "image/png" in o.get("data", {})]
    assert len(pictures) == 2  # the two overlays side by side, then the PCA picture
