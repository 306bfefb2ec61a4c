"""Bad input to the model magics: each gives one error paragraph and leaves nothing behind.

A user-fixable mistake is a ``UsageError`` naming what was wrong and how to fix
it; afterwards the registry holds exactly the versions it held before, no
deployment record exists, and no model server runs. The store is real (sqlite
MLflow with models logged by MLflow) so "unknown alias" and "a run without a
model" are refused by looking, not by guessing.
"""

from __future__ import annotations

import socket

import pytest
from mlflow.tracking import MlflowClient

from hubml_testing.kernel import KernelSession, kernel_env, processes_with_home
from hubml_testing.model_runs import LOG_RUNS_CODE

pytestmark = pytest.mark.slow

BUSY = "{busy_port}"
NO_RUN = "0123456789abcdef0123456789abcdef"

#: (invocation, a fragment the UsageError must contain). ``{run}`` is a run
#: with a model at "model", ``{bare}`` a run without any model.
CORPUS = [
    # %register_model
    ("%register_model --name iris-clf", "There is no run to register"),
    ("%register_model --run {run}", "%register_model needs --name NAME"),
    (f"%register_model --run {NO_RUN} --name iris-clf", f"Run '{NO_RUN}' does not exist"),
    ("%register_model --run not-a-run! --name iris-clf", "is not an MLflow run id"),
    ("%register_model --run {bare} --name iris-clf", "has no logged model at all"),
    ("%register_model --run {run} --name iris-clf --artifact-path clf", "no model at artifact path 'clf'"),
    ("%register_model --run {run} --name iris-clf --artifact-path ../x", "must be a relative path"),
    ("%register_model --run {run} --name 'bad name!'", "Model name 'bad name!' is not allowed"),
    ("%register_model --run {run} --name iris-clf --alias latest", "'latest' is reserved"),
    ("%register_model --run {run} --name iris-clf --alias 9lives", "Alias '9lives' is not allowed"),
    ("%register_model --run {run} --name iris-clf --tag novalue", "--tag expects KEY=VALUE, got 'novalue'"),
    ("%register_model --run {run} --name iris-clf --tag =v", "--tag expects KEY=VALUE"),
    ("%register_model --run {run} --name iris-clf --tag a=1 --tag a=2", "--tag a is given twice"),
    ("%register_model --run {run} --name iris-clf --stage Production", "unrecognized arguments: --stage"),
    # %models
    ("%models --backend cloud", "--backend must be one of auto, local, hub; got 'cloud'"),
    # %deploy
    ("%deploy", "%deploy needs the model to serve"),
    ("%deploy --promote", "argument --promote: expected one argument"),
    ("%deploy --promote iris-clf --rollback iris-clf", "Give --promote or --rollback, not both"),
    ("%deploy iris-clf --promote iris-clf", "takes only --backend; remove a model"),
    ("%deploy --rollback iris-clf --canary 20 --max-replicas 3", "remove --canary, --max-replicas"),
    ("%deploy --promote Bad_Name", "Deployment name 'Bad_Name' is not a valid name"),
    ("%deploy --promote nosuch", "No deployment named 'nosuch'"),
    ("%deploy --rollback iris-clf", "No deployment named 'iris-clf'"),
    ("%deploy nosuch", "No registered model named 'nosuch'"),
    ("%deploy iris-clf@challenger", "Model 'iris-clf' has no alias 'challenger' (its aliases: @champion)"),
    ("%deploy iris-clf/7", "Model 'iris-clf' has no version 7 (versions: 1)"),
    ("%deploy iris-clf/abc", "the version after '/' must be a positive whole number"),
    ("%deploy iris-clf/0", "the version after '/' must be a positive whole number"),
    ("%deploy iris-clf@champion/1", "give either @alias or /version, not both"),
    ("%deploy Iris_Model", "cannot name a deployment"),
    ("%deploy iris-clf --name Bad_Name", "Deployment name 'Bad_Name' is not a valid name"),
    ("%deploy iris-clf --port 80", "--port must be a whole number from 1024 to 65535; got 80"),
    ("%deploy iris-clf --port http", "invalid int value: 'http'"),
    ("%deploy iris-clf --port " + BUSY, "is already in use by another program"),
    ("%deploy iris-clf --timeout -1", "--timeout must be a number of seconds from 1 to 3600; got -1.0"),
    ("%deploy iris-clf --timeout soon", "invalid float value: 'soon'"),
    ("%deploy iris-clf --replicas 3", "unrecognized arguments: --replicas 3"),
    ("%deploy iris-clf --canary 150", "--canary must be a percentage from 1 to 99; got 150"),
    ("%deploy iris-clf --min-replicas 3 --max-replicas 2", "--max-replicas (2) must be at least --min-replicas (3)"),
    ("%deploy iris-clf --canary 20", "--canary and --profile need the hub backend"),
    ("%deploy iris-clf --max-replicas 4", "serves exactly one replica on this machine"),
    ("%deploy iris-clf --profile a100", "--canary and --profile need the hub backend"),
    # %deployments / %undeploy
    ("%deployments --all", "unrecognized arguments: --all"),
    ("%undeploy", "the following arguments are required: name"),
    ("%undeploy nosuch", "No deployment named 'nosuch'. There are no deployments."),
    ("%undeploy ../etc", "Deployment name '../etc' is not a valid name"),
    # %predict
    ("%predict", "%predict needs a deployment name and the data"),
    ("%predict iris-clf", "%predict needs a deployment name and the data"),
    ("%predict nosuch [[5.1, 3.5, 1.4, 0.2]]", "No deployment named 'nosuch'"),
    ("%predict iris-clf [[5.1, 3.5,", "DATA is neither a Python/JSON literal nor a notebook variable name"),
    ("%predict iris-clf undefined_rows", "DATA 'undefined_rows' is not defined in the notebook"),
    ("%predict iris-clf []", "The data to predict on is empty"),
    ("%predict iris-clf [[1e999, 0, 0, 0]]", "cannot be sent as JSON"),
    ('%predict iris-clf {"a": [1, 2], "b": [3]}', "The columns have different lengths (a: 2, b: 1)"),
    ("%predict iris-clf 'just text'", "Cannot send a str to a model"),
]


def _versions(client: MlflowClient) -> list[tuple[str, str]]:
    return sorted((mv.name, str(mv.version)) for mv in client.search_model_versions())


def test_bad_model_invocations_give_one_usage_error_and_leave_nothing(hubml_kernel: KernelSession, hubml_home):
    k = hubml_kernel
    # Runs exist but no %%train ran in this kernel: "no run to register" is about the kernel.
    k.run_ok(LOG_RUNS_CODE + "\nruns = log_runs({'run': {'artifact_path': 'model'}, 'bare': {}})", timeout=240)
    run = k.run_ok("print(runs['run'])").stdout.strip()
    bare = k.run_ok("print(runs['bare'])").stdout.strip()
    k.run_ok(f"%register_model --run {run} --name iris-clf --alias champion")
    k.run_ok(f"%register_model --run {run} --name Iris_Model")
    client = MlflowClient(kernel_env(hubml_home)["MLFLOW_TRACKING_URI"])
    before = _versions(client)
    assert before == [("Iris_Model", "1"), ("iris-clf", "1")]

    problems = []
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        busy_port = str(busy.getsockname()[1])
        for template, fragment in CORPUS:
            code = template.replace("{run}", run).replace("{bare}", bare).replace(BUSY, busy_port)
            res = k.run(code, timeout=120)
            message = res.evalue or ""
            if res.ename != "UsageError":
                problems.append(f"{code!r}: expected UsageError, got {res.ename}: {message}\n{res.text}")
                continue
            if fragment not in message:
                problems.append(f"{code!r}: message does not name the problem ({fragment!r}): {message}")
            if "\n\n" in message.strip() or "Traceback" in res.text:
                problems.append(f"{code!r}: not one paragraph: {message!r}")
            left = [p.pid for p in processes_with_home(hubml_home) if p.pid != k.pid]
            records = sorted(p.name for p in (hubml_home / "deployments").glob("*")
                             if p.name != ".lock") if (hubml_home / "deployments").exists() else []
            if _versions(client) != before or left or records:
                problems.append(f"{code!r}: left something behind: versions={_versions(client)} "
                                f"processes={left} files={records}")
    assert not problems, "\n".join(problems)

    # Interrupting %deploy while it waits (Jupyter's stop button) stops the half-started server.
    res = k.run("%deploy iris-clf --name interrupted", timeout=120,
                interrupt_when=lambda r: "waiting until its server answers" in r.stdout)
    assert res.ename == "KeyboardInterrupt", res
    assert [p.pid for p in processes_with_home(hubml_home) if p.pid != k.pid] == []
    assert sorted(p.name for p in (hubml_home / "deployments").glob("*") if p.name != ".lock") == []
    assert [m.name for m in client.search_registered_models()] == ["Iris_Model", "iris-clf"]
    assert len(CORPUS) >= 25
