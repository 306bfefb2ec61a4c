"""The README's demo: ``examples/quickstart.ipynb`` executed headless by ``dev/demo.py``.

2-worker DDP training through ``%%train`` (torch.distributed.run, gloo on CPU),
``%register_model`` of that run (no ``--run``: the last run of the kernel),
``%deploy``, ``%predict`` against the real model server, ``%undeploy``. Runs in
the ``hubml_home`` fixture's home, which fails the test if any worker or server
of that home is left running.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_quickstart_notebook_trains_registers_deploys_and_predicts(hubml_home: Path, tmp_path: Path) -> None:
    out = tmp_path / "quickstart.out.ipynb"
    done = subprocess.run([sys.executable, str(ROOT / "dev" / "demo.py"), "--home", str(hubml_home),
                           "--output", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    # Iris row 0 is a setosa, row 100 a virginica; the trained classifier must say so.
    assert "prediction: setosa" in done.stdout and "prediction: virginica" in done.stdout, done.stdout
    assert "Registered iris-clf version 1, alias @champion" in done.stdout
    assert "Deployment 'iris-clf' stopped and removed." in done.stdout
    nb = nbformat.read(out, as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert errors == []
    assert list((hubml_home / "deployments").glob("*.json")) == []
