"""Every notebook in examples/ runs top to bottom in a fresh kernel, offline, within a time limit.

The kernel gets `KPRUNE_OFFLINE=1`, so the notebooks take their offline path (the bundled
digits, no CIFAR-10 download). nbclient, nbformat and ipykernel come with the `dev` extra, so
CI (`.ci/run`, which installs `.[dev,hub]` and runs all of tests/) runs these; where they are
missing the tests skip, except under `CI=...`, where a missing runner fails. The five notebooks
take about five minutes together on a loaded 2-core machine.
"""

import os
import pathlib
import time

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
CELL_TIMEOUT = 300        # seconds, any one cell
NOTEBOOK_LIMIT = 360      # seconds, a whole notebook on a loaded 2-core machine

if os.environ.get("CI"):
    import nbclient  # noqa: F401  (CI installs the dev extra: a missing runner is a failure)
    import nbformat
else:
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("ipykernel")


def test_there_are_notebooks():
    assert {p.name for p in NOTEBOOKS} >= {"oneshot.ipynb", "resrep_digits.ipynb",
                                          "slimming_digits.ipynb", "condensenet_digits.ipynb",
                                          "keras_hub.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_starts_with_an_install_cell(path):
    nb = nbformat.read(path, as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    assert "KPRUNE_SOURCE" in code[0] and "%pip install" in code[0], path.name
    assert "list_physical_devices(\"GPU\")" in code[1] and "KPRUNE_OFFLINE" in code[1]
    # The committed copy was run top to bottom and carries its outputs.
    counts = [c.execution_count for c in nb.cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1)), f"{path.name} has unrun cells"
    assert any(o.get("output_type") == "display_data" for c in nb.cells
               if c.cell_type == "code" for o in c.outputs), f"{path.name} shows no picture"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_offline(path, monkeypatch):
    if path.stem == "keras_hub" and not os.environ.get("CI"):
        pytest.importorskip("keras_hub", reason="the KerasHub notebook needs kprune[hub]")
    monkeypatch.setenv("KPRUNE_OFFLINE", "1")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(EXAMPLES)}})
    start = time.monotonic()
    client.execute()
    seconds = time.monotonic() - start
    assert seconds < NOTEBOOK_LIMIT, f"{path.name} took {seconds:.0f} s"
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs)
    assert "digits" in text                                  # the offline data path was taken
    assert "GPUs:" in text
