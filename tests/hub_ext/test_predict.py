"""``%predict`` on the hub backend, end to end against a real model server.

The hub service is configured the way an administrator of a cluster with an
ingress/gateway would (``HubMLService.deployment_url_template``), with the base
URL pointing at a loopback port. On that port the test runs the very server the
scoring Deployment's pod runs: ``mlflow models serve --env-manager local`` on the
registered version, resolved through the real MLflow server. So the notebook's
``%predict`` goes kernel -> hub service (owner check, URL) -> model server, and
the predictions are the model's own.

For KServe, the InferenceService's status is patched the way KServe's controller
sets it (``status.url``, ``status.address.url``), and ``%deployments`` /
``%predict`` must use that reported URL. The Open Inference Protocol body is
checked as a pure function (no MLServer here).
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import mlflow
import pytest

from hubml.errors import InvalidRequest
from hubml.hub_ext import kube as k
from hubml.hub_ext import ownership, serving_objects
from hubml.hub_ext.endpoints import DEFAULT_TEMPLATES, Endpoints, check_template
from hubml import scoring
from hubml.magics import hub
from hubml.magics.local import model_server
from hubml_testing.kube import wait_for
from hubml_testing.model_runs import SETOSA
from hubml_testing.ports import free_port

from .conftest import start_stack, stop_stack

VIRGINICA = [6.7, 3.0, 5.2, 2.3]


# --------------------------------------------------------------------------- pure: the URL setting


@pytest.mark.parametrize("template, fragment", [
    ("ftp://models/{name}", "http:// or https://"),
    ("models.example.org/{name}", "http:// or https://"),
    ("http:///{name}", "with a host"),
    ("http://gw/{model}", "uses {model}"),
    ("http://gw/{name:>9}", "uses {name:>9}"),
    ("http://gw/{name.__class__}", "uses {name.__class__}"),
    ("http://gw/{name!r}", "uses {name!r}"),
    ("http://gw/{", "not a valid template"),
    ("http://gw/{name}?x=1", "query or fragment"),
    ("http://gw/{name}#top", "query or fragment"),
    ("http://gw:99999/{name}", "bad port"),
    ("http://gw/ {name}", "whitespace"),
    ("   ", "empty"),
])
def test_bad_url_templates_are_refused_with_the_reason(template, fragment):
    with pytest.raises(ValueError) as info:
        check_template(template)
    assert fragment in str(info.value)
    assert "deployment_url_template" in str(info.value)


def test_bad_url_template_stops_the_service_at_startup(tmp_path):
    """The traitlet refuses it when the config file is loaded, before anything connects."""
    import os
    import subprocess
    import sys

    cfg = tmp_path / "cfg.py"
    cfg.write_text("c = get_config()  # noqa\nc.HubMLService.mlflow_tracking_uri = 'http://127.0.0.1:9'\n"
                   "c.HubMLService.deployment_url_template = 'http://gw/{deployment}'\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "MLFLOW_"))}
    env["JUPYTERHUB_API_TOKEN"] = "x"
    done = subprocess.run([sys.executable, "-m", "hubml.hub_ext", f"--config={cfg}"], capture_output=True,
                          text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode != 0
    assert "uses {deployment}; the placeholders are {name}, {namespace}, {user}, {flavour}" in done.stderr


def _isvc(name: str = "iris", status: dict[str, Any] | None = None, *, v2: bool = False,
          predictor_name: str = "") -> dict[str, Any]:
    model = {"modelFormat": {"name": "mlflow"}, **({"protocolVersion": "v2"} if v2 else {"runtime": "hubml-mlflow"})}
    predictor = {"model": model, **({"name": predictor_name} if predictor_name else {})}
    return {"kind": "InferenceService", "metadata": {"name": name, "namespace": "ml", "labels": {
        ownership.LABEL_USER: "alice"}}, "spec": {"predictor": predictor}, "status": status or {}}


def _dep(name: str = "iris") -> dict[str, Any]:
    return {"kind": "Deployment", "metadata": {"name": name, "namespace": "ml", "labels": {
        ownership.LABEL_USER: "alice"}}}


def test_default_urls_are_in_cluster_dns_per_flavour():
    assert Endpoints().url_for(_dep()) == "http://iris.ml.svc.cluster.local/invocations"
    # hubml's runtime runs MLflow's scoring server; KServe's own (MLServer) speaks the Open Inference Protocol
    assert Endpoints().url_for(_isvc()) == "http://iris-predictor.ml.svc.cluster.local/invocations"
    assert Endpoints().url_for(_isvc(v2=True)) == "http://iris-predictor.ml.svc.cluster.local/v2/models/iris/infer"
    # Standard mode after a promotion: the stable predictor carries the canary's name, so does its Service
    assert Endpoints().url_for(_isvc(predictor_name="v2")) == "http://iris-v2-predictor.ml.svc.cluster.local/invocations"
    assert serving_objects.deployment_url("iris", "ml", kserve=False) == "http://iris.ml.svc.cluster.local/invocations"
    assert set(DEFAULT_TEMPLATES) == {"deployment", "kserve"}


def test_template_placeholders_and_kserve_reported_urls():
    gw = Endpoints("https://gw.example.org/{flavour}/{user}/{namespace}/{name}/").validate()
    assert gw.url_for(_dep()) == "https://gw.example.org/deployment/alice/ml/iris/invocations"
    assert gw.url_for(_isvc(v2=True)) == "https://gw.example.org/kserve/alice/ml/iris/v2/models/iris/infer"
    assert gw.url_for(_isvc(predictor_name="v2")) == "https://gw.example.org/kserve/alice/ml/iris/invocations"
    # what KServe's controller reports (raw deployment mode): the ingress URL and the cluster-local address
    reported = {"url": "http://iris-ml.example.com",
                "address": {"url": "http://iris-predictor.ml.svc.cluster.local"}}
    assert gw.url_for(_isvc(status=reported)) == "http://iris-predictor.ml.svc.cluster.local/invocations"
    assert Endpoints(kserve_url_field="url").url_for(_isvc(status=reported, v2=True)) == \
        "http://iris-ml.example.com/v2/models/iris/infer"
    assert Endpoints(gw.template, "none").url_for(_isvc(status=reported)).startswith("https://gw.example.org/")
    # only address set yet, or a malformed report: the next best
    assert Endpoints(kserve_url_field="url").url_for(_isvc(status={"address": {"url": "http://a.b"}})) == \
        "http://iris-predictor.ml.svc.cluster.local/invocations"
    assert gw.url_for(_isvc(status={"address": {"url": "javascript:alert(1)"}})).startswith("https://gw.")
    with pytest.raises(ValueError, match="kserve_url_field"):
        Endpoints(kserve_url_field="ingress").validate()


# --------------------------------------------------------------------------- pure: the V2 request

_OIP_DATATYPES = {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
                  "FP64", "BYTES"}


def _check_oip_request(body: dict[str, Any]) -> None:
    """The Open Inference Protocol's ``$inference_request`` (REST): ``inputs`` of ``$request_input``
    (name, shape, datatype, data; optional parameters) and ``data`` holding exactly prod(shape)
    elements, flattened row-major, of the datatype's JSON type."""
    assert set(body) <= {"id", "parameters", "inputs", "outputs"}
    assert isinstance(body["inputs"], list) and body["inputs"]
    if "parameters" in body:
        assert isinstance(body["parameters"], dict)
    for tensor in body["inputs"]:
        assert set(tensor) <= {"name", "shape", "datatype", "parameters", "data"}
        assert isinstance(tensor["name"], str) and tensor["name"]
        assert all(isinstance(d, int) and d >= 0 for d in tensor["shape"])
        assert tensor["datatype"] in _OIP_DATATYPES
        assert len(tensor["data"]) == math.prod(tensor["shape"])
        json_type = {"BOOL": bool, "BYTES": str}.get(tensor["datatype"], int if "INT" in tensor["datatype"]
                                                     else (int, float))
        assert all(isinstance(x, json_type) for x in tensor["data"])


def test_v2_request_is_an_open_inference_protocol_request():
    import numpy as np
    import pandas as pd

    # rows: one FP64 tensor decoded by MLServer as a NumPy array (content_type np), shape preserved
    body = scoring.v2_request(scoring.scoring_payload([SETOSA, VIRGINICA]))
    _check_oip_request(body)
    assert body["parameters"] == {"content_type": "np"}
    (tensor,) = body["inputs"]
    assert tensor["shape"] == [2, 4] and tensor["datatype"] == "FP64"
    assert np.array(tensor["data"]).reshape(tensor["shape"]).tolist() == [SETOSA, VIRGINICA]
    body = scoring.v2_request(scoring.scoring_payload(np.arange(24).reshape(2, 3, 4)))
    _check_oip_request(body)
    assert body["inputs"][0]["shape"] == [2, 3, 4] and body["inputs"][0]["datatype"] == "INT64"
    assert body["inputs"][0]["data"] == list(range(24))

    # named columns: one tensor per column, decoded by MLServer as a pandas DataFrame (content_type pd)
    frame = pd.DataFrame({"sl": [5.1, 6.7], "n": [1, 2], "ok": [True, False], "tag": ["a", "b"]})
    for data in (frame, frame.to_dict(orient="list"), frame.to_dict(orient="records")):
        body = scoring.v2_request(scoring.scoring_payload(data))
        _check_oip_request(body)
        assert body["parameters"] == {"content_type": "pd"}
        assert [(t["name"], t["datatype"], t["shape"]) for t in body["inputs"]] == [
            ("sl", "FP64", [2]), ("n", "INT64", [2]), ("ok", "BOOL", [2]), ("tag", "BYTES", [2])]
        rebuilt = pd.DataFrame({t["name"]: t["data"] for t in body["inputs"]})
        assert rebuilt.equals(frame)

    # the response: one output's flat data back into rows; several by name
    answer = {"model_name": "iris", "outputs": [{"name": "output-1", "shape": [2, 1], "datatype": "INT64",
                                                 "data": [0, 2]}]}
    assert scoring.v2_outputs(answer) == [0, 2]  # as MLflow's /invocations answers for the same model
    answer["outputs"].append({"name": "proba", "shape": [2, 3], "datatype": "FP64",
                              "data": [0.9, 0.05, 0.05, 0.1, 0.1, 0.8]})
    assert scoring.v2_outputs(answer) == {"output-1": [0, 2], "proba": [[0.9, 0.05, 0.05], [0.1, 0.1, 0.8]]}


@pytest.mark.parametrize("data, fragment", [
    ([[1.0, 2.0], [3.0]], "different lengths"),
    ([[1.0, [2.0]], [3.0, 4.0]], "nested unevenly"),
    ([[1.0, "a"]], "one type per tensor"),
    ({"a": [1.0, None]}, "one type per tensor"),
])
def test_v2_request_refuses_what_the_protocol_cannot_carry(data, fragment):
    with pytest.raises(InvalidRequest, match=fragment):
        scoring.v2_request(scoring.scoring_payload(data))


# --------------------------------------------------------------------------- end to end


class Stack:
    """The hub service with ``deployment_url_template`` pointing at ``port``, where a model server may run."""

    def __init__(self, svc: Any, port: int, tmp: Path, mlflow_url: str) -> None:
        self.svc, self.port, self.tmp, self.mlflow_url = svc, port, tmp, mlflow_url
        self.server: model_server.ServerProcess | None = None

    def serve(self, model_uri: str) -> None:
        """Run what the scoring Deployment's pod runs (``mlflow models serve --env-manager local``) on the port."""
        env = model_server.server_env(self.mlflow_url, self.tmp)
        self.server = model_server.start(model_uri, self.port, self.tmp / "model-server.log", env)
        outcome = model_server.wait_ready(self.server, timeout=180)
        assert outcome == "ready", f"model server {outcome}:\n{model_server.log_tail(self.server.log_path, 30)}"

    def stop_serving(self) -> None:
        if self.server is not None:
            model_server.stop(self.server)
            self.server = None


@pytest.fixture(scope="module")
async def stack(kube_cluster, mlflow_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict")
    port = free_port()
    try:
        svc = await start_stack(kube_cluster, mlflow_server.url, tmp, users=["alice", "bob"],
                                extra_config=f"c.HubMLService.deployment_url_template = "
                                             f"'http://127.0.0.1:{port}/'\n")
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    st = Stack(svc, port, tmp, mlflow_server.url)
    try:
        yield st
    finally:
        st.stop_serving()
        await stop_stack(svc)


def _kernel_env(svc: Any, user: str) -> dict[str, str]:
    return {"JUPYTERHUB_API_TOKEN": svc.tokens[user], "JUPYTERHUB_API_URL": svc.hub.api_url,
            "HUBML_SERVICE_URL": svc.url, "JUPYTERHUB_USER": user}


async def _alice_registers(stack: Stack, kernel_factory: Any, make_run: Any, options: str) -> tuple[Any, Any]:
    """A run of alice's made by ``make_run``, registered from a kernel of hers; (the kernel, the cell's result)."""
    run_id = await asyncio.to_thread(make_run, stack.svc, stack.mlflow_url)
    alice = await asyncio.to_thread(kernel_factory, extra_env=_kernel_env(stack.svc, "alice"))
    return alice, await asyncio.to_thread(alice.run_ok, f"%register_model --run {run_id} {options}")


async def _deploy(svc: Any, kernel: Any, model: str, name: str) -> tuple[str, list[str]]:
    """``%deploy MODEL --name NAME`` in the kernel: what it printed, and the command of the Deployment's pod."""
    res = await asyncio.to_thread(kernel.run_ok, f"%deploy {model} --name {name}")
    dep = await svc.kube.get(k.DEPLOYMENT, svc.namespace, name)
    return res.stdout, dep["spec"]["template"]["spec"]["containers"][0]["command"]


def _alice_run(svc: Any, mlflow_url: str, log_model) -> str:
    """A run the service created for alice (so it is hers), with the model ``log_model()`` logs into it."""
    status, job = svc.call("POST", "/jobs", {"code": "print(1)\n", "experiment": "hub-predict"})
    assert status == 201, job
    status, _ = svc.call("POST", f"/jobs/{job['id']}/cancel")
    assert status == 200
    mlflow.set_tracking_uri(mlflow_url)
    try:
        with mlflow.start_run(run_id=job["run_id"]):
            log_model()
    finally:
        mlflow.set_tracking_uri(None)
    return job["run_id"]


def _alice_run_with_iris_model(svc: Any, mlflow_url: str) -> str:
    """Alice's run with a fitted iris classifier logged by MLflow."""
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    X, y = load_iris(return_X_y=True)
    return _alice_run(svc, mlflow_url, lambda: mlflow.sklearn.log_model(
        LogisticRegression(max_iter=500).fit(X, y), name="model", pip_requirements=["scikit-learn"]))


def _alice_run_with_one_row_torch_model(svc: Any, mlflow_url: str) -> str:
    """Alice's run with a PyTorch model exported (pt2) from a one-row input_example: it refuses two rows."""
    import torch

    torch.manual_seed(0)
    return _alice_run(svc, mlflow_url, lambda: mlflow.pytorch.log_model(
        torch.nn.Linear(3, 2), name="model", input_example=torch.randn(1, 3).numpy(), pip_requirements=["torch"]))


@pytest.mark.kube
@pytest.mark.hub
@pytest.mark.slow
async def test_predict_from_a_kernel_reaches_the_real_scoring_server(stack, kube_cluster, kernel_factory):
    svc = stack.svc
    alice, res = await _alice_registers(stack, kernel_factory, _alice_run_with_iris_model,
                                        "--name hub-iris --alias champion")
    assert "Registered hub-iris version 1" in res.stdout

    with kube_cluster.without_crds("inferenceservice"):
        stdout, command = await _deploy(svc, alice, "hub-iris@champion", "iris-dep")
        expected_url = f"http://127.0.0.1:{stack.port}/invocations"
        assert f"at {expected_url}" in stdout, stdout
        model_uri = command[command.index("--model-uri") + 1]
        assert model_uri == "models:/hub-iris/1"
        assert command[command.index("--env-manager") + 1] == "local"

        async def ready() -> bool:
            status, body = await asyncio.to_thread(svc.call, "GET", "/deployments/iris-dep")
            return status == 200 and body["state"] == "ready"

        await wait_for(ready, timeout=60, what="the scoring Deployment to be ready (kwok pods)")
        res = await asyncio.to_thread(alice.run_ok, "%deployments")
        assert "iris-dep" in res.stdout and expected_url in res.stdout and "ready" in res.stdout

        # the same command the pod runs, on the port the template names
        await asyncio.to_thread(stack.serve, model_uri)
        try:
            res = await asyncio.to_thread(alice.run_ok, f"preds = %predict iris-dep [{SETOSA}, {VIRGINICA}]\n"
                                                        "print(preds)")
            assert res.stdout.strip() == "[0, 2]"
            res = await asyncio.to_thread(alice.run_ok, "import pandas as pd\n"
                                                        f"df = pd.DataFrame([{VIRGINICA}])\n"
                                                        "%predict iris-dep df")
            assert res.result == "[2]"
            res = await asyncio.to_thread(alice.run_ok, f"import hubml\nhubml.predict('iris-dep', [{SETOSA}])")
            assert res.result == "[0]"

            # bad data: the scoring server's own 400 as one paragraph; client-side refusals before any request
            res = await asyncio.to_thread(alice.run, "%predict iris-dep [[1.0, 2.0]]")
            assert res.ename == "UsageError", res
            assert "Deployment 'iris-dep' refused the data (HTTP 400)" in res.evalue
            assert "X has 2 features" in res.evalue, res.evalue  # the model's own cause, from the stack trace
            assert "5.1" not in res.evalue, res.evalue           # no example rows of some other model
            assert "Traceback" not in res.error_text
            for bad, fragment in (("'just text'", "Cannot send a str"), ("[]", "The data to predict on is empty"),
                                  ("[[1e999, 0, 0, 0]]", "cannot be sent as JSON")):
                res = await asyncio.to_thread(alice.run, f"%predict iris-dep {bad}")
                assert res.ename == "UsageError" and fragment in res.evalue, (bad, res)

            # another user: bob cannot use alice's deployment, though the model server is up
            bob = await asyncio.to_thread(kernel_factory, extra_env=_kernel_env(svc, "bob"))
            res = await asyncio.to_thread(bob.run, f"%predict iris-dep [{SETOSA}]")
            assert res.ename == "UsageError", res
            assert "belongs to another user" in res.evalue and "[0]" not in res.text
            res = await asyncio.to_thread(bob.run, f"%predict no-such-dep [{SETOSA}]")
            assert res.ename == "UsageError" and "does not exist" in res.evalue, res
            status, body = await asyncio.to_thread(svc.call, "GET", "/deployments/iris-dep", user="bob")
            assert status == 403, body
        finally:
            await asyncio.to_thread(stack.stop_serving)

        # the server is down: a BackendError naming the deployment, its URL and the next step, no traceback
        res = await asyncio.to_thread(alice.run, f"%predict iris-dep [{SETOSA}]")
        assert res.ename == "BackendError", res
        assert res.traceback[0].startswith(f"BackendError: Deployment 'iris-dep' did not answer at {expected_url}")
        assert any(line.startswith("Next step: %deployments shows its state") for line in res.traceback), res
        assert not any("Traceback" in line or line.lstrip().startswith("File ") for line in res.traceback), res

        res = await asyncio.to_thread(alice.run_ok, "%undeploy iris-dep")
        assert await svc.kube.get_or_none(k.DEPLOYMENT, svc.namespace, "iris-dep") is None
        res = await asyncio.to_thread(alice.run, f"%predict iris-dep [{SETOSA}]")
        assert res.ename == "UsageError" and "does not exist" in res.evalue, res


@pytest.mark.kube
@pytest.mark.hub
@pytest.mark.slow
async def test_kserve_reported_url_is_what_deployments_and_predict_use(stack, kernel_factory):
    svc = stack.svc
    run_id = await asyncio.to_thread(_alice_run_with_iris_model, svc, stack.mlflow_url)
    status, body = await asyncio.to_thread(svc.call, "POST", "/models", {"name": "hub-iris-kserve", "run_id": run_id})
    assert status == 201, body
    alice = await asyncio.to_thread(kernel_factory, extra_env=_kernel_env(svc, "alice"))
    res = await asyncio.to_thread(alice.run_ok, "%deploy hub-iris-kserve --name iris-isvc")
    # KServe has not reported anything yet: the administrator's template
    assert f"http://127.0.0.1:{stack.port}/invocations" in res.stdout, res.stdout
    assert await svc.kube.get(k.INFERENCE_SERVICE, svc.namespace, "iris-isvc")

    # KServe's controller reconciles it: status.url (ingress domain) and status.address.url (cluster-local);
    # the address points at a loopback port where nothing listens, so %predict's error names it
    dead_port = free_port()
    reported = f"http://127.0.0.1:{dead_port}"
    path = (f"/apis/serving.kserve.io/v1beta1/namespaces/{svc.namespace}/inferenceservices/iris-isvc/status")
    await svc.kube.request("PATCH", path, content_type="application/merge-patch+json", body={"status": {
        "url": f"http://iris-isvc-{svc.namespace}.example.com",
        "address": {"url": reported},
        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}})
    isvc = await svc.kube.get(k.INFERENCE_SERVICE, svc.namespace, "iris-isvc")
    assert isvc["status"]["address"]["url"] == reported  # the CRD's status schema kept it

    res = await asyncio.to_thread(alice.run_ok, "%deployments")
    line = next(row for row in res.stdout.splitlines() if row.startswith("iris-isvc"))
    assert f"{reported}/invocations" in line and "ready" in line and "100% v1" in line, res.stdout
    res = await asyncio.to_thread(alice.run, f"%predict iris-isvc [{SETOSA}]")
    assert res.ename == "BackendError", res
    assert f"did not answer at {reported}/invocations" in res.traceback[0], res
    # bad data is refused before anything is sent, whatever the protocol
    res = await asyncio.to_thread(alice.run, "%predict iris-isvc [[1.0, 2.0], [3.0]]")
    assert res.ename == "UsageError" and "different lengths" in res.evalue, res

    status, _ = await asyncio.to_thread(svc.call, "DELETE", "/deployments/iris-isvc")
    assert status == 204


@pytest.mark.kube
@pytest.mark.hub
@pytest.mark.slow
async def test_predict_refusal_names_the_servers_cause_and_the_signature(stack, kube_cluster, kernel_factory):
    """The hub backend's %predict error for a model that refuses the batch: the cause and the signature."""
    svc = stack.svc
    alice, _ = await _alice_registers(stack, kernel_factory, _alice_run_with_one_row_torch_model, "--name hub-torch")
    status, body = await asyncio.to_thread(svc.call, "GET", "/models/hub-torch/versions/1")
    assert status == 200 and body["signature"] == "[Tensor('float32', (-1, 3))]", body
    for user, path, code in (("bob", "/models/hub-torch/versions/1", 403),
                             ("alice", "/models/hub-torch/versions/9", 404),
                             ("alice", "/models/hub-torch/versions/x", 404), ("alice", "/models/no%20such/versions/1", 404)):
        status, body = await asyncio.to_thread(svc.call, "GET", path, user=user)
        assert status == code, (user, path, body)
    with kube_cluster.without_crds("inferenceservice"):
        _, command = await _deploy(svc, alice, "hub-torch", "torch-dep")
        await asyncio.to_thread(stack.serve, command[command.index("--model-uri") + 1])
        try:
            res = await asyncio.to_thread(alice.run, "%predict torch-dep [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]")
            assert res.ename == "UsageError", res
            assert "refused the data (HTTP 400)" in res.evalue, res.evalue
            assert "Guard failed: input.size()[0] == 1" in res.evalue, res.evalue
            assert "Tensor('float32', (-1, 3))" in res.evalue and "5.1" not in res.evalue, res.evalue
        finally:
            await asyncio.to_thread(stack.stop_serving)
        await asyncio.to_thread(alice.run_ok, "%undeploy torch-dep")
