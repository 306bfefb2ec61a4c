"""The README's tour, as written: its ``%%train`` snippet and the register/deploy/predict lines after it.

Both blocks are read from README.md (under the headings "Train: `%%train`" and
"Register, deploy, predict"), never copied here, so the README cannot drift
from code that runs. The training cell runs through the local backend exactly
as a user pastes it: real ``torch.distributed.run``, gloo, as many workers as
the snippet says. The tour lines run one per cell, without their trailing
``# ...`` explanations (in a notebook each is its own cell).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from hubml_testing.kernel import KernelSession

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def readme_block(heading: str) -> str:
    """The first fenced code block after the README heading ``### <heading>``."""
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n### {heading}\n")
    match = re.compile(r"^```[a-z]*\n(.*?)^```$", re.S | re.M).search(text, start)
    assert match, f"no code block after the README heading {heading!r}"
    return match.group(1)


def test_readme_train_snippet_runs_as_written_and_the_tour_serves_its_model(hubml_kernel: KernelSession,
                                                                           hubml_home: Path) -> None:
    block = readme_block("Train: `%%train`")
    setup, train = block.split("%%train", 1)
    train = "%%train" + train
    workers = int(re.match(r"%%train[^\n]*--workers (\d+)", train).group(1))
    k = hubml_kernel
    k.run_ok(setup)  # %load_ext hubml (already loaded by the fixture: a no-op)
    k.run_ok(train, timeout=600)  # JobFailed (a UsageError) would fail the cell
    res = k.run_ok("from hubml.magics.session import SESSION\n"
                   "b = SESSION.backend(None); job = b.jobs()[0]\n"
                   "print(job.state.value, job.workers, bool(b.run_metrics(job.run_id)['loss']))")
    assert res.stdout.split() == ["succeeded", str(workers), "True"], res.text

    tour = [line.split("#", 1)[0].strip() for line in readme_block("Register, deploy, predict").splitlines()]
    tour = [line for line in tour if line]
    assert tour[0].startswith("%register_model") and any(line.startswith("%predict") for line in tour), tour
    outputs = {}
    for line in tour:
        outputs[line.split()[0]] = k.run_ok(line, timeout=300)
    assert "Registered iris-clf version 1, alias @champion" in outputs["%register_model"].stdout
    [row] = ast.literal_eval(outputs["%predict"].result)  # one row in, one row of class scores out
    assert len(row) == 3 and all(isinstance(x, float) for x in row), outputs["%predict"].text
    assert "stopped and removed" in outputs["%undeploy"].stdout
    assert list((hubml_home / "deployments").glob("*.json")) == []
