"""Bad input to %%train and the job magics: each gives exactly one UsageError
paragraph naming what was wrong, and creates nothing (no job directory, no
MLflow store or run, no process).
"""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from hubml_testing.kernel import KernelSession, kernel_env
from hubml_testing.train_cells import QUICK_CELL, job_dirs, job_processes

CELL = "\n" + QUICK_CELL

#: (invocation, a fragment the message must contain)
CORPUS = [
    ("%%train\n", "the cell body is empty"),  # IPython's own check for cell magics
    ("%%train --workers 2\n   \n\t\n", "cell is empty"),
    ("%%train --workers 0" + CELL, "--workers must be a whole number from 1 to 256; got 0"),
    ("%%train --workers -2" + CELL, "--workers must be a whole number from 1 to 256; got -2"),
    ("%%train --workers two" + CELL, "invalid int value: 'two'"),
    ("%%train -n 1000" + CELL, "got 1000"),
    ("%%train --gpus-per-worker -1" + CELL, "--gpus-per-worker must be a whole number from 0 to 16"),
    ("%%train --gpus-per-worker 1 --workers 2" + CELL, "needs 2 GPU(s), but this machine has 0"),
    ("%%train --profile a100" + CELL, "--profile a100 selects a GPU profile of the hub"),
    ("%%train --profile Bad_Name!" + CELL, "'Bad_Name!' is not a valid name"),
    ("%%train --env RANK=3" + CELL, "--env RANK is set by hubml or by torch.distributed.run"),
    ("%%train --env MLFLOW_RUN_ID=abc" + CELL, "--env MLFLOW_RUN_ID is set by hubml"),
    ("%%train --env NVIDIA_VISIBLE_DEVICES=all" + CELL, "--env NVIDIA_VISIBLE_DEVICES is set by hubml"),
    ("%%train --env NOEQUALS" + CELL, "--env expects KEY=VALUE, got 'NOEQUALS'"),
    ("%%train --env 1BAD=x" + CELL, "'1BAD' is not a valid environment variable name"),
    ("%%train --env A=1 --env A=2" + CELL, "--env A is given twice"),
    ("%%train --timeout 0" + CELL, "--timeout '0' is not a duration here: it must be finite and positive"),
    ("%%train --timeout=-5m" + CELL, "--timeout '-5m' is not a duration"),
    ("%%train --timeout -5m" + CELL, "argument --timeout: expected one argument"),
    ("%%train --timeout soon" + CELL, "--timeout 'soon' is not a duration"),
    ("%%train --timeout inf" + CELL, "--timeout 'inf' is not a duration"),
    ("%%train --wrokers 2" + CELL, "unrecognized arguments: --wrokers 2"),
    ("%%train --backend cloud" + CELL, "--backend must be one of auto, local, hub; got 'cloud'"),
    ('%%train --experiment ""' + CELL, "--experiment must be a non-empty name"),
    ("%%train --run-name '   '" + CELL, "--run-name must be a non-empty name"),
    ("%%train --no-wait extra" + CELL, "unrecognized arguments: extra"),
    ("%train_status job-000000", "There is no job job-000000"),
    ("%train_status", "There is no training job yet"),
    ("%train_logs ../../etc/passwd", "'../../etc/passwd' is not a job id"),
    ("%train_logs job-abcdef --rank x", "invalid int value: 'x'"),
    ("%train_cancel nope", "'nope' is not a job id"),
    ("%train_cancel", "the following arguments are required: JOB"),
    ("%jobs --all", "unrecognized arguments: --all"),
    ("%%train --run-name 'unclosed" + CELL, "check the quotes"),
    # refused before any worker starts: where, the line, Python's reason and the fix
    ("%%train --workers 2\nimport os\nfor i in range(3)\n    print(i)\n",
     "not valid Python: line 2, column 18 (`for i in range(3)`): expected ':'. Each worker runs the cell as a "
     "standalone Python script (line 1 is the first line below %%train), so nothing was started: fix that line"),
    ("%%train\n!pip install torch\n" + QUICK_CELL, "line 1, column 1 (`!pip install torch`): invalid syntax"),
]


def test_bad_invocations_give_one_usage_error_and_create_nothing(hubml_kernel: KernelSession, hubml_home):
    problems = []
    for code, fragment in CORPUS:
        res = hubml_kernel.run(code, timeout=60)
        message = res.evalue or ""
        if res.ename != "UsageError":
            problems.append(f"{code!r}: expected UsageError, got {res.ename}: {message}\n{res.text}")
            continue
        if fragment not in message:
            problems.append(f"{code!r}: message does not name the problem ({fragment!r}): {message}")
        if "\n\n" in message.strip() or "Traceback" in res.text:
            problems.append(f"{code!r}: not one paragraph: {message!r}")
        if job_dirs(hubml_home) or (hubml_home / "mlflow.db").exists() or job_processes(hubml_home, hubml_kernel):
            problems.append(f"{code!r}: left something behind: jobs={job_dirs(hubml_home)} "
                            f"db={(hubml_home / 'mlflow.db').exists()}")
    assert not problems, "\n".join(problems)
    assert len(CORPUS) >= 18


def test_deleted_experiment_is_refused_before_any_run(hubml_kernel: KernelSession, hubml_home):
    client = MlflowClient(kernel_env(hubml_home)["MLFLOW_TRACKING_URI"])
    exp_id = client.create_experiment("gone")
    client.delete_experiment(exp_id)
    res = hubml_kernel.run("%%train --experiment gone" + CELL)
    assert res.ename == "UsageError", res
    assert "Experiment 'gone' was deleted" in res.evalue and "restore" in res.evalue
    assert job_dirs(hubml_home) == []
    assert client.search_runs([exp_id], run_view_type=3) == []
    assert job_processes(hubml_home, hubml_kernel) == []
