"""%register_model, %models, %deploy, %deployments, %predict, %undeploy in a real kernel.

Real ipykernel (``hubml_testing.kernel``), real sqlite MLflow store, real models
logged by MLflow, real ``mlflow models serve`` processes answering HTTP. The
``hubml_home`` fixture fails the test if any process of that home (a model
server) is still running afterwards.
"""

from __future__ import annotations

import json
import re
import signal
import urllib.request

import psutil
import pytest

from hubml_testing.kernel import KernelSession
from hubml_testing.model_runs import LOG_RUNS_CODE, LOG_TORCH_ONE_ROW_CODE, SETOSA

pytestmark = pytest.mark.slow

URL = re.compile(r"at (http://127\.0\.0\.1:\d+/invocations)")


def _deployment_records(home) -> list[str]:
    return sorted(p.name for p in (home / "deployments").glob("*.json"))


def test_register_deploy_predict_survive_restart_dead_and_undeploy(hubml_kernel: KernelSession, hubml_home):
    k = hubml_kernel
    k.run_ok(LOG_RUNS_CODE + "\nruns = log_runs({'v1': {'artifact_path': 'model', 'shift': 0}})", timeout=240)
    run_id = k.run_ok("print(runs['v1'])").stdout.strip()

    res = k.run_ok(f"%register_model --run {run_id} --name iris-clf --alias champion --tag team=ml")
    assert f"Registered iris-clf version 1, alias @champion (run {run_id})." in res.stdout
    res = k.run_ok("%models")
    assert re.search(r"^iris-clf\s+1\s+@champion -> 1\s+" + run_id, res.stdout, re.M), res.stdout

    res = k.run_ok("%deploy iris-clf@champion", timeout=300)
    url = URL.search(res.stdout).group(1)
    assert "Deployment 'iris-clf' serves iris-clf@champion (version 1)" in res.stdout
    body = json.dumps({"inputs": [SETOSA]}).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:  # the printed URL answers real HTTP
        assert json.loads(resp.read()) == {"predictions": [0]}

    res = k.run_ok(f"preds = %predict iris-clf [{SETOSA}, [6.7, 3.0, 5.2, 2.3]]\nprint(preds)")
    assert res.stdout.strip() == "[0, 2]"
    res = k.run_ok(f"X = [{SETOSA}]\n%predict iris-clf X")
    assert res.result == "[0]"
    res = k.run_ok("import pandas as pd\n"
                   f"df = pd.DataFrame([{SETOSA}], columns=['sl', 'sw', 'pl', 'pw'])\n"
                   "%predict iris-clf df")
    assert res.result == "[0]"
    res = k.run_ok("import hubml\nfrom hubml.magics import api\n"
                   "print(hubml.predict('iris-clf', X), api.predict('iris-clf', {'a': [6.7], 'b': [3.0], "
                   "'c': [5.2], 'd': [2.3]}), [d.state for d in hubml.deployments()])")
    assert res.stdout.strip() == "[0] [2] ['ready']"
    res = k.run("%predict iris-clf [[1.0, 2.0]]")  # the server's own 400, as one paragraph
    assert res.ename == "UsageError" and "refused the data (HTTP 400)" in res.evalue, res

    # Deployments live outside the kernel: a restarted kernel lists and uses them.
    old_kernel = k.pid
    k.restart()
    assert k.pid != old_kernel
    res = k.run_ok("%deployments")
    assert re.search(r"^iris-clf\s+iris-clf@champion\s+1\s+ready\s+100% v1\s+" + re.escape(url), res.stdout, re.M), res
    assert k.run_ok(f"%predict iris-clf [{SETOSA}]").result == "[0]"

    # Kill the server behind the kernel's back: reported as dead, with a next step.
    [record] = _deployment_records(hubml_home)
    pid = json.loads((hubml_home / "deployments" / record).read_text())["pid"]
    tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for proc in tree:
        proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(tree, timeout=10)
    res = k.run_ok("%deployments")
    assert re.search(r"^iris-clf\s+iris-clf@champion\s+1\s+dead", res.stdout, re.M), res
    assert "%undeploy iris-clf to clear it" in res.stdout
    res = k.run(f"%predict iris-clf [{SETOSA}]")
    assert res.ename == "BackendError", res
    assert "Deployment 'iris-clf' is dead" in res.evalue
    assert any("Next step: %deploy iris-clf@champion --name iris-clf" in line for line in res.traceback), res
    assert not any("Traceback" in line for line in res.traceback), res

    res = k.run_ok("%undeploy iris-clf")
    assert "Deployment 'iris-clf' stopped and removed." in res.stdout
    assert "No deployments." in k.run_ok("%deployments").stdout
    assert _deployment_records(hubml_home) == []



def test_predict_error_carries_the_servers_cause_and_the_models_signature(hubml_kernel: KernelSession, hubml_home):
    """A pt2 PyTorch model exported from a one-row input_example refuses two rows; %predict says why.

    MLflow's scoring server answers only a generic "Verify that the serialized
    input Dataframe is compatible..." in ``message``; the model's own failure is
    at the end of ``stack_trace``. The error must carry it and the signature
    recorded in the version's MLmodel, and no example rows of another model.
    """
    k = hubml_kernel
    res = k.run_ok(LOG_TORCH_ONE_ROW_CODE, timeout=240)
    run_id = json.loads(res.stdout.strip().splitlines()[-1])["run_id"]
    k.run_ok(f"%register_model --run {run_id} --name torch-one-row")
    k.run_ok("%deploy torch-one-row", timeout=300)
    try:
        assert len(json.loads(k.run_ok("%predict torch-one-row [[1.0, 2.0, 3.0]]").result)) == 1
        res = k.run("%predict torch-one-row [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]")
        assert res.ename == "UsageError", res
        message = res.evalue
        assert "refused the data (HTTP 400)" in message
        assert "Guard failed: input.size()[0] == 1" in message, message  # the server's own cause
        assert "Tensor('float32', (-1, 3))" in message, message         # the version's input signature
        assert "5.1" not in message and "iris" not in message.lower(), message
        assert "\n\n" not in message.strip() and "Traceback" not in res.text, res.text
    finally:
        k.run_ok("%undeploy torch-one-row")
