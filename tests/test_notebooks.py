"""Execute the notebooks in fast mode, and keep the stored notebooks free of outputs.

The kernel is a kernelspec written into ``tmp_path`` that runs *this* interpreter
(``sys.executable``), found through a ``KernelSpecManager`` that looks nowhere else: a ``python3``
kernelspec of the user or the system (another Python, without actpat) can never be picked up.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
ipykernel_kernelspec = pytest.importorskip("ipykernel.kernelspec")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402  (after the importorskips)
from jupyter_client.manager import KernelManager  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ("01_quickstart.ipynb", "02_paper_reproduction.ipynb", "03_information_plane.ipynb")
KERNEL_NAME = "actpat-test"
CELL_TIMEOUT_S = 300


def _kernel_manager(tmp_path: Path) -> KernelManager:
    kernels = tmp_path / "kernels"
    ipykernel_kernelspec.write_kernel_spec(path=kernels / KERNEL_NAME)
    argv = json.loads((kernels / KERNEL_NAME / "kernel.json").read_text())["argv"]
    assert argv[0] == sys.executable, f"kernelspec runs {argv[0]!r}, not this interpreter {sys.executable!r}"
    specs = KernelSpecManager(kernel_dirs=[str(kernels)])
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)


def _execute(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple:
    """Run a notebook in fast mode with cwd and outputs in ``tmp_path``; return (notebook, out dir)."""
    out = tmp_path / "out"
    monkeypatch.setenv("ACTPAT_FAST", "1")
    monkeypatch.setenv("ACTPAT_OUT", str(out))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        km=_kernel_manager(tmp_path),
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    return nb, out


def _outputs(nb, mime: str) -> list[str]:
    return [
        "".join(output.get("data", {}).get(mime, ""))
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if mime in output.get("data", {})
    ]


@pytest.mark.notebook
def test_quickstart_runs(tmp_path, monkeypatch):
    nb, out = _execute("01_quickstart.ipynb", tmp_path, monkeypatch)
    base = out / "01_quickstart"
    assert list((base / "patterns").glob("*.h5")), "the callback wrote no shard"
    figures = {p.name for p in (base / "figures").glob("*.png")}
    assert {"heatmap_normalized_entropy.png", "heatmap_weighted_jaccard_final.png"} <= figures
    assert list((base / "tb" / "offline").glob("events.out.tfevents.*")), "to_tensorboard wrote nothing"
    assert list((base / "tb" / "quickstart").rglob("events.out.tfevents.*")), "no live TensorBoard log"
    assert len(_outputs(nb, "image/png")) >= 3, "the heatmaps and curves were not displayed"


@pytest.mark.notebook
def test_paper_reproduction_runs(tmp_path, monkeypatch):
    nb, out = _execute("02_paper_reproduction.ipynb", tmp_path, monkeypatch)
    base = out / "02_paper_reproduction"
    for kind in ("resnet", "plain", "fixup"):
        for seed in (0, 1):  # fast mode: two seeds
            assert list((base / kind / f"seed{seed}" / "patterns").glob("*.h5")), f"no shard for {kind}, seed {seed}"
    for metric in ("normalized_entropy", "weighted_jaccard_final", "weighted_jaccard_wc_final"):
        assert (base / f"heatmaps_{metric}.png").stat().st_size > 0
    findings = (base / "findings.md").read_text()
    for name in ("ResNet-8", "ConvNet-8", "FixUp-8", "width-controlled", "0.58"):
        assert name in findings
    assert "Fast mode" in findings
    assert any("Spearman" in text for text in _outputs(nb, "text/markdown"))
    assert len(_outputs(nb, "image/png")) >= 7, "the heatmaps and band curves were not displayed"


@pytest.mark.notebook
def test_information_plane_runs(tmp_path, monkeypatch):
    nb, out = _execute("03_information_plane.ipynb", tmp_path, monkeypatch)
    base = out / "03_information_plane"
    for name in ("tanh", "relu"):
        assert list((base / name / "patterns").glob("*.h5")), f"no shard for {name}"
    assert (base / "information_planes.png").stat().st_size > 0
    assert (base / "figs" / "information_plane.png").stat().st_size > 0, "actpat plot drew no information plane"
    assert len(_outputs(nb, "image/png")) >= 2, "the grid of planes and the CLI's figure were not displayed"
    tables = _outputs(nb, "text/html")
    assert any("input_information_lower" in t for t in tables), "the KDE table was not shown"
    assert any("saturated" in t for t in tables), "the binary estimator's saturation table was not shown"


@pytest.mark.parametrize("name", NAMES)
def test_stored_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, f"{name} has no code cell"
    dirty = [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, f"{name}: cells {dirty} have outputs or execution counts; strip them before committing"
    assert "widgets" not in nb.metadata, f"{name} stores widget state"
