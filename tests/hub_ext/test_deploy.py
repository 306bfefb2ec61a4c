"""Models and deployments through the hub service: registry ownership, KServe InferenceService where the
CRD exists, the Deployment + Service + HPA trio where it does not, isolation between users."""

from __future__ import annotations

import asyncio
import json

import mlflow
import mlflow.pyfunc
import pytest

from hubml.hub_ext import kube as k
from hubml.hub_ext import ownership
from hubml_testing.kube import wait_for

pytestmark = [pytest.mark.kube, pytest.mark.hub, pytest.mark.slow]


class Doubler(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input * 2


@pytest.fixture(scope="module")
def alice_model(hub_service, mlflow_server):
    """A model logged into a run the service created for alice, registered through the API."""
    status, job = hub_service.call("POST", "/jobs", {"code": "print(1)\n", "experiment": "hub-ext-deploy"})
    assert status == 201, job
    status, _ = hub_service.call("POST", f"/jobs/{job['id']}/cancel")
    assert status == 200
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    mlflow.set_tracking_uri(mlflow_server.url)
    try:
        with mlflow.start_run(run_id=job["run_id"]):
            mlflow.pyfunc.log_model(name="model", python_model=Doubler())
    finally:
        mlflow.set_tracking_uri(None)
    assert client.get_run(job["run_id"]).data.tags["hubml.user"] == "alice"
    return job["run_id"]


def test_register_and_list_models(hub_service, alice_model, mlflow_server):
    svc = hub_service
    status, body = svc.call("POST", "/models", {"name": "hubext-iris", "run_id": alice_model, "alias": "champion"})
    assert status == 201, body
    assert body["version"] == 1 and body["aliases"] == ["champion"]
    # the source rule both backends share (hubml.registry): the logged model's artifact location, linked by id
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    [logged] = [m for m in client.search_logged_models(experiment_ids=[client.get_run(alice_model).info.experiment_id])
                if m.source_run_id == alice_model]
    version = client.get_model_version("hubext-iris", "1")
    assert body["source"] == version.source == logged.artifact_location
    links = json.loads(client.get_logged_model(logged.model_id).tags["mlflow.modelVersions"])
    assert [str(v["version"]) for v in links if v["name"] == version.name] == [str(version.version)]
    status, models = svc.call("GET", "/models")
    assert status == 200 and [m["name"] for m in models] == ["hubext-iris"]
    assert models[0]["aliases"] == {"champion": 1}
    # bob cannot register alice's run, nor add versions to alice's model, nor see it
    status, body = svc.call("POST", "/models", {"name": "bob-model", "run_id": alice_model}, user="bob")
    assert status == 403 and "your own runs" in body["error"]
    status, models = svc.call("GET", "/models", user="bob")
    assert status == 200 and models == []
    for bad, fragment in (({"name": "x"}, "'run_id' is a required property"),
                          ({"name": "../x", "run_id": "abc"}, "Invalid name"),
                          ({"name": "ok", "run_id": "abc", "artifact_path": "../../etc"}, "--artifact-path"),
                          ({"name": "ok", "run_id": "0" * 32}, "does not exist"),
                          ({"name": "ok", "run_id": alice_model, "alias": "latest"}, "reserved")):
        status, body = svc.call("POST", "/models", bad)
        assert status in (400, 404), (bad, body)
        assert fragment in body["error"], (bad, body)


async def test_inference_service_and_canary(hub_service, alice_model):
    svc = hub_service
    status, body = await asyncio.to_thread(svc.call, "POST", "/models", {"name": "hubext-isvc", "run_id": alice_model})
    assert status == 201, body
    status, dep = await asyncio.to_thread(svc.call, "POST", "/deployments",
                                          {"model": "hubext-isvc/1", "name": "isvc-a", "min_replicas": 1,
                                           "max_replicas": 3})
    assert status == 201, dep
    assert dep["version"] == 1 and dep["state"] == "starting" and dep["url"].endswith("/invocations")
    isvc = await svc.kube.get(k.INFERENCE_SERVICE, svc.namespace, "isvc-a")
    pred = isvc["spec"]["predictor"]
    assert pred["model"]["modelFormat"]["name"] == "mlflow" and pred["model"]["storageUri"]
    assert (pred["minReplicas"], pred["maxReplicas"]) == (1, 3)
    assert isvc["metadata"]["labels"][ownership.LABEL_USER] == "alice"

    # a second version as a 20 % canary on the same endpoint (Standard mode, KServe 0.20: a named canary;
    # tests/hub_ext/test_canary.py has the rest of the rollout)
    status, _ = await asyncio.to_thread(svc.call, "POST", "/models", {"name": "hubext-isvc", "run_id": alice_model})
    assert status == 201
    status, dep = await asyncio.to_thread(svc.call, "POST", "/deployments",
                                          {"model": "hubext-isvc", "name": "isvc-a", "canary_percent": 20})
    assert status == 201 and dep["version"] == 1 and dep["canary"]["version"] == 2, dep
    isvc = await svc.kube.get(k.INFERENCE_SERVICE, svc.namespace, "isvc-a")
    assert [c["trafficPercent"] for c in isvc["spec"]["canary"]] == [20]
    assert "canaryTrafficPercent" not in isvc["spec"]["predictor"]

    # bob: 403 on alice's deployment, 409 on her name, 403 on her model
    for method in ("GET", "DELETE"):
        status, body = await asyncio.to_thread(svc.call, method, "/deployments/isvc-a", user="bob")
        assert status == 403, body
    status, body = await asyncio.to_thread(svc.call, "POST", "/deployments",
                                           {"model": "hubext-isvc", "name": "isvc-a"}, user="bob")
    assert status == 409 and "taken by another user" in body["error"]
    status, body = await asyncio.to_thread(svc.call, "POST", "/deployments",
                                           {"model": "hubext-isvc", "name": "bob-dep"}, user="bob")
    assert status == 403 and "another user" in body["error"]
    assert await svc.kube.get_or_none(k.INFERENCE_SERVICE, svc.namespace, "bob-dep") is None

    status, listed = await asyncio.to_thread(svc.call, "GET", "/deployments")
    assert status == 200 and [d["name"] for d in listed] == ["isvc-a"]
    status, _ = await asyncio.to_thread(svc.call, "DELETE", "/deployments/isvc-a")
    assert status == 204
    assert await svc.kube.get_or_none(k.INFERENCE_SERVICE, svc.namespace, "isvc-a") is None
    status, body = await asyncio.to_thread(svc.call, "GET", "/deployments/isvc-a")
    assert status == 404


BAD_DEPLOYS = [
    ({"model": "hubext-isvc"}, "'name' is a required property"),
    ({"model": "hubext-isvc", "name": "Bad_Name"}, "Invalid name"),
    ({"model": "", "name": "x"}, "Invalid model"),
    ({"model": "a@b/1", "name": "x"}, "either @alias or /version"),
    ({"model": "hubext-isvc", "name": "x", "min_replicas": 5, "max_replicas": 2}, "--max-replicas"),
    ({"model": "hubext-isvc", "name": "x", "canary_percent": 100}, "Invalid canary_percent"),
    ({"model": "hubext-isvc", "name": "x", "namespace": "kube-system"}, "Additional properties"),
    ({"model": "no-such-model", "name": "x"}, "No registered model"),
]


@pytest.mark.parametrize("body, fragment", BAD_DEPLOYS)
def test_bad_deploy_requests(hub_service, body, fragment):
    status, answer = hub_service.call("POST", "/deployments", body, user="carol")
    assert status in (400, 404), answer
    assert fragment in answer["error"]


async def test_deployment_trio_without_kserve(hub_service, kube_cluster, alice_model):
    svc = hub_service
    status, body = await asyncio.to_thread(svc.call, "POST", "/models", {"name": "hubext-trio", "run_id": alice_model})
    assert status == 201, body
    with kube_cluster.without_crds("inferenceservice"):
        status, info = await asyncio.to_thread(svc.call, "GET", "/")
        assert info["serving"] == "deployment"
        status, body = await asyncio.to_thread(svc.call, "POST", "/deployments",
                                               {"model": "hubext-trio", "name": "trio", "canary_percent": 10})
        assert status == 400 and "needs KServe" in body["error"]
        status, dep = await asyncio.to_thread(svc.call, "POST", "/deployments",
                                              {"model": "hubext-trio@", "name": "trio"})
        assert status == 400
        status, dep = await asyncio.to_thread(svc.call, "POST", "/deployments",
                                              {"model": "hubext-trio", "name": "trio", "max_replicas": 4})
        assert status == 201, dep
        assert dep["url"] == f"http://trio.{svc.namespace}.svc.cluster.local/invocations"
        d = await svc.kube.get(k.DEPLOYMENT, svc.namespace, "trio")
        cmd = d["spec"]["template"]["spec"]["containers"][0]["command"]
        assert cmd[:3] == ["mlflow", "models", "serve"] and "models:/hubext-trio/1" in cmd
        s = await svc.kube.get(k.SERVICE, svc.namespace, "trio")
        hpa = await svc.kube.get(k.HPA, svc.namespace, "trio")
        assert s["spec"]["selector"] == d["spec"]["selector"]["matchLabels"]
        assert hpa["spec"]["scaleTargetRef"]["name"] == "trio" and hpa["spec"]["maxReplicas"] == 4

        async def ready():
            status, body = await asyncio.to_thread(svc.call, "GET", "/deployments/trio")
            return body if body["state"] == "ready" else None

        info = await wait_for(ready, timeout=60, what="the scoring Deployment to be ready (kwok pods)")
        assert info["version"] == 1 and info["model"] == "hubext-trio"
        status, _ = await asyncio.to_thread(svc.call, "DELETE", "/deployments/trio", user="bob")
        assert status == 403
        status, _ = await asyncio.to_thread(svc.call, "DELETE", "/deployments/trio")
        assert status == 204
        for res in (k.DEPLOYMENT, k.SERVICE, k.HPA):
            assert await svc.kube.get_or_none(res, svc.namespace, "trio") is None
