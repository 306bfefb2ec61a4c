"""The shared domain model: every backend and the hub service rely on these rules."""

from __future__ import annotations

import pytest

from hubml import names
from hubml.errors import BackendError, InvalidRequest, JobFailed
from hubml.jobs import JobState, JobStatus, TrainSpec, WorkerStatus
from hubml.models import DeploySpec, ModelRef, RegisterRequest

BAD_SPECS = [
    (dict(code=""), "empty"),
    (dict(code="   \n\t"), "empty"),
    (dict(code="x=1", workers=0), "--workers"),
    (dict(code="x=1", workers=-3), "--workers"),
    (dict(code="x=1", workers=10_000), "--workers"),
    (dict(code="x=1", workers=True), "--workers"),
    (dict(code="x=1", workers=2.5), "--workers"),
    (dict(code="x=1", gpus_per_worker=-1), "--gpus-per-worker"),
    (dict(code="x=1", gpus_per_worker=99), "--gpus-per-worker"),
    (dict(code="x=1", profile="A100_Big"), "Profile"),
    (dict(code="x=1", experiment=""), "--experiment"),
    (dict(code="x=1", run_name=" "), "--run-name"),
    (dict(code="x=1", env={"RANK": "3"}), "RANK"),
    (dict(code="x=1", env={"1BAD": "x"}), "1BAD"),
    (dict(code="x=1", timeout=0), "--timeout"),
    (dict(code="x=1", timeout=float("inf")), "--timeout"),
    (dict(code="x" * (600 * 1024)), "KiB"),
]


@pytest.mark.parametrize("fields,needle", BAD_SPECS)
def test_bad_train_specs_are_refused_with_a_paragraph(fields, needle):
    with pytest.raises(InvalidRequest) as info:
        TrainSpec(**fields).validate()
    message = str(info.value)
    assert needle in message
    assert "\n" not in message.strip()


#: cells that compile only if a worker would start them: (code, fragments of the one-paragraph refusal)
SYNTAX_ERRORS = [
    ("import os\nfor i in range(3)\n    print(i)\n", ["line 2, column 18 (`for i in range(3)`)", "expected ':'",
                                                   "fix that line"]),
    ("x = (1,\ny = 2\n", ["line 1, column 5 (`x = (1,`)", "'(' was never closed"]),
    ("for i in x:\nprint(i)\n", ["line 2, column 1", "expected an indented block after 'for' statement on line 1"]),
    ("import os\n%pip install torch\n", ["line 2, column 1 (`%pip install torch`)", "%magics and !shell"]),
    ("!nvidia-smi\n", ["line 1, column 1", "%magics and !shell"]),
    ("s = 'é' +\n", ["line 1, column 10"]),  # characters, not UTF-8 bytes
    ("return 5\n", ["line 1, column 1 (`return 5`)", "'return' outside function"]),  # the compiler's own check
    ("def f(a, a):\n    pass\n", ["line 1, column 10", "duplicate argument 'a'"]),
    ("# coding: ascii\ns = 'é'\n", ["cannot be read as Python", "'# coding: utf-8'"]),  # as the worker reads it
    ("a = 1\r\nb = 2\x00\n", ["line 2, column 6 holds a NUL character"]),
    ("a = '\ud800'\n", ["U+D800 at line 1, column 6"]),
    ("x = " + "-" * 100_000 + "1\n", ["nests expressions too deeply"]),
    ("x = " + "1 + " * 150 + "\n", ["line 1, column 605 (`… 1 + 1", "1 + 1 +`): invalid syntax."]),  # a window
    ("print(1 2)\n", ["invalid syntax. Perhaps you forgot a comma? Each worker"]),
]


@pytest.mark.parametrize("code,fragments", SYNTAX_ERRORS)
def test_code_that_would_not_compile_in_a_worker_is_refused_with_where_and_why(code, fragments):
    with pytest.raises(InvalidRequest) as info:
        TrainSpec(code=code).validate()
    message = str(info.value)
    assert all(fragment in message for fragment in fragments), message
    assert "\n" not in message and len(message) < 600


@pytest.mark.parametrize("code", [
    "\ufeffprint(1)\n",                   # a byte order mark is read as one by the interpreter
    "assert (1, 'always true')\n",         # a SyntaxWarning only warns in the worker
    "import torch\nx = undefined_name\n",  # a NameError is the worker's business, not the compiler's
])
def test_code_the_interpreter_accepts_is_not_refused(code):
    assert TrainSpec(code=code).validate().code == code


def test_good_spec_round_trips_through_json_dict():
    spec = TrainSpec(code="print(1)", workers=4, gpus_per_worker=1, profile="a100",
                     experiment="iris", env={"LR": "0.1"}, timeout=60.0).validate()
    assert TrainSpec.from_dict(spec.to_dict()) == spec


def test_unknown_spec_field_is_refused():
    with pytest.raises(InvalidRequest, match="namespace"):
        TrainSpec.from_dict({"code": "x", "namespace": "kube-system"})


def test_job_status_round_trip_keeps_worker_states():
    status = JobStatus(id="j1", state=JobState.FAILED, workers=2, backend="local", created=1.0,
                       failed_rank=1, exit_code=3,
                       worker_states=[WorkerStatus(0, JobState.SUCCEEDED, 0), WorkerStatus(1, JobState.FAILED, 3)])
    again = JobStatus.from_dict(status.to_dict())
    assert again == status
    assert again.state.finished and not JobState.RUNNING.finished


@pytest.mark.parametrize("text,expected", [
    ("iris-clf", ModelRef("iris-clf")),
    ("iris-clf@champion", ModelRef("iris-clf", alias="champion")),
    ("iris-clf/3", ModelRef("iris-clf", version=3)),
])
def test_model_refs(text, expected):
    ref = ModelRef.parse(text)
    assert ref == expected
    assert str(ref) == text
    assert ref.uri.startswith("models:/iris-clf")


@pytest.mark.parametrize("text", ["", "@champion", "iris/0", "iris/x", "iris@", "iris@a/2", "../etc", "iris@latest", "a b"])
def test_bad_model_refs(text):
    with pytest.raises(InvalidRequest):
        ModelRef.parse(text)


@pytest.mark.parametrize("item", ["NOVALUE", "=x", "A-B=1", "WORLD_SIZE=2", "MLFLOW_RUN_ID=abc"])
def test_bad_env_pairs(item):
    with pytest.raises(InvalidRequest):
        names.env_pairs([item])


def test_env_given_twice_with_different_values():
    with pytest.raises(InvalidRequest, match="twice"):
        names.env_pairs(["A=1", "A=2"])
    assert names.env_pairs(["A=1", "A=1", "B=x=y"]) == {"A": "1", "B": "x=y"}


@pytest.mark.parametrize("fields", [
    dict(name="Bad_Name"), dict(name="x" * 64), dict(min_replicas=-1), dict(max_replicas=0),
    dict(min_replicas=3, max_replicas=2), dict(canary_percent=0), dict(canary_percent=100), dict(profile="GPU!"),
])
def test_bad_deploy_specs(fields):
    base = dict(model=ModelRef("iris"), name="iris")
    base.update(fields)
    with pytest.raises(InvalidRequest):
        DeploySpec(**base).validate()


@pytest.mark.parametrize("fields", [
    dict(name="bad name"), dict(alias="9lives"), dict(run_id=""), dict(run_id="../x"),
    dict(artifact_path="/abs"), dict(artifact_path="a/../../b"), dict(tags={"": "x"}),
])
def test_bad_register_requests(fields):
    base = dict(name="iris", run_id="a" * 32)
    base.update(fields)
    with pytest.raises(InvalidRequest):
        RegisterRequest(**base).validate()


def test_backend_errors_render_without_traceback():
    err = JobFailed("Worker rank 1 exited with code 3.", rank=1, exit_code=3, log_tail="boom",
                    next_step="Fix the error in the cell and run it again.")
    rendered = "\n".join(err._render_traceback_())
    assert "rank 1" in rendered and "boom" in rendered and "Next step:" in rendered
    assert "Traceback" not in rendered
    assert isinstance(err, BackendError)
