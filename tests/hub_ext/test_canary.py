"""KServe canaries through the hub service, on KServe's real CRDs: Standard-mode named canaries (v0.20's
``spec.canary[]``), Knative-mode ``canaryTrafficPercent``, an older KServe without ``spec.canary`` (refused,
nothing changed), promote and rollback, bad inputs and other users' deployments; and the storage URIs KServe
can read."""

from __future__ import annotations

import asyncio
import copy
import json

import mlflow
import mlflow.pyfunc
import pytest

from hubml.errors import Conflict, InvalidRequest
from hubml.hub_ext import canary, storage_uris
from hubml.hub_ext import kube as k
from hubml.hub_ext import ownership
from hubml_testing.kube_crds import crd_file, load_crd

from .conftest import running_stack

SPEC = ownership.ANNOTATION_SPEC


# ---------------------------------------------------------------- pure: schema detection and rollout steps


def _isvc_schema(release: str) -> dict:
    return load_crd(crd_file("inferenceservice", release))["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_canary_schema_is_detected_from_the_real_crds():
    assert canary.schema_has_canary(_isvc_schema("current"))
    assert not canary.schema_has_canary(_isvc_schema("previous"))
    assert not canary.schema_has_canary({})


def _obj(version: int, *, mode: str = "Standard", canary_rec: dict | None = None, spec: dict | None = None) -> dict:
    rec = {"model": f"m/{version}", "model_name": "m", "version": version, "created": 1.0}
    if canary_rec:
        rec["canary"] = canary_rec
    return {"kind": "InferenceService",
            "metadata": {"name": "dep", "resourceVersion": "7",
                         "annotations": {SPEC: json.dumps(rec), canary.MODE_ANNOTATION: mode}},
            "spec": spec or {"predictor": {"minReplicas": 2, "maxReplicas": 4, "model": {
                "modelFormat": {"name": "mlflow"}, "storageUri": f"s3://b/{version}"}}}}


def _new(version: int) -> tuple[dict, dict]:
    obj = _obj(version)
    return obj, ownership.spec_record(obj)


def test_standard_canary_promote_and_rollback_steps():
    existing = _obj(1)
    new, rec = _new(2)
    change = canary.with_canary(existing, new, rec, mode="Standard", percent=20, has_canary_schema=True)
    assert change.spec["predictor"] == existing["spec"]["predictor"]  # the stable one is untouched
    # the canary schema requires the model container's name, which KServe calls kserve-container
    model = {**new["spec"]["predictor"]["model"], "name": "kserve-container"}
    assert change.spec["canary"] == [{"predictor": {"name": "v2", "model": model}, "trafficPercent": 20}]
    assert change.record["version"] == 1 and change.record["canary"]["version"] == 2
    running = {**existing, "spec": change.spec,
               "metadata": {**existing["metadata"], "annotations": {SPEC: json.dumps(change.record)}}}
    # the same version again re-weights; another version, or a plain redeploy, is refused
    again = canary.with_canary(running, new, rec, mode="Standard", percent=50, has_canary_schema=True)
    assert again.spec["canary"][0]["trafficPercent"] == 50
    with pytest.raises(Conflict, match="already has a canary"):
        canary.with_canary(running, *_new(3), mode="Standard", percent=10, has_canary_schema=True)
    with pytest.raises(Conflict, match="Promote it"):
        canary.replacement(running, *_new(3), mode="Standard")
    promoted = canary.promoted(running, mode="Standard")
    assert promoted.spec["predictor"]["name"] == "v2" and "canary" not in promoted.spec
    assert promoted.spec["predictor"]["model"]["storageUri"] == "s3://b/2"
    assert promoted.spec["predictor"]["minReplicas"] == 2  # the stable predictor's scaling stays
    assert promoted.record["version"] == 2 and "canary" not in promoted.record
    rolled = canary.rolled_back(running, mode="Standard")
    assert rolled.spec == existing["spec"] and rolled.record["version"] == 1 and "canary" not in rolled.record
    for step in (canary.promoted, canary.rolled_back):
        with pytest.raises(Conflict, match="has no canary"):
            step(existing, mode="Standard")
    # a plain redeploy after a promotion keeps the stable predictor's name (so its Deployment and URL)
    after = {**running, "spec": promoted.spec,
             "metadata": {**running["metadata"], "annotations": {SPEC: json.dumps(promoted.record)}}}
    assert canary.replacement(after, *_new(3), mode="Standard").spec["predictor"]["name"] == "v2"
    with pytest.raises(Conflict, match="already serves version 1"):
        canary.with_canary(existing, *_new(1), mode="Standard", percent=10, has_canary_schema=True)
    with pytest.raises(InvalidRequest, match="before 0.20"):
        canary.with_canary(existing, new, rec, mode="Standard", percent=20, has_canary_schema=False)


def test_knative_canary_steps():
    existing = _obj(1, mode="Knative")
    new, rec = _new(2)
    change = canary.with_canary(existing, new, rec, mode="Knative", percent=30, has_canary_schema=False)
    assert change.spec["predictor"]["canaryTrafficPercent"] == 30
    assert change.spec["predictor"]["model"]["storageUri"] == "s3://b/2" and "canary" not in change.spec
    running = {**existing, "spec": change.spec,
               "metadata": {**existing["metadata"], "annotations": {SPEC: json.dumps(change.record),
                                                                     canary.MODE_ANNOTATION: "Knative"}}}
    assert "canaryTrafficPercent" not in canary.promoted(running, mode="Knative").spec["predictor"]
    rolled = canary.rolled_back(running, mode="Knative")
    assert rolled.spec["predictor"]["canaryTrafficPercent"] == 0 and rolled.record["version"] == 1
    assert canary.mode_of(running, "Standard") == "Knative"
    assert canary.mode_of({"metadata": {"annotations": {canary.MODE_ANNOTATION: "Serverless"}}}, "Standard") == "Knative"
    assert canary.normal_mode("RawDeployment") == "Standard"
    with pytest.raises(ValueError, match="not one of Standard, Knative"):
        canary.normal_mode("ModelMesh")


def test_canary_readiness_as_kserve_reports_it():
    rec = {"model": "m/2", "model_name": "m", "version": 2, "percent": 20, "name": "v2"}
    obj = _obj(1, canary_rec=rec)
    assert canary.canary_status(obj, mode="Standard")["ready"] is None
    obj["status"] = {"canaryStatuses": [{"name": "v2", "ready": False, "trafficPercent": 20}]}
    assert canary.canary_status(obj, mode="Standard")["ready"] is False
    obj["status"] = {"conditions": [{"type": "CanaryPredictorReady", "status": "True"}]}
    assert canary.canary_status(obj, mode="Standard")["ready"] is True
    obj["status"] = {"components": {"predictor": {"latestCreatedRevision": "r2", "latestReadyRevision": "r1"}}}
    assert canary.canary_status(obj, mode="Knative")["ready"] is False
    assert canary.canary_status(_obj(1), mode="Standard") is None


@pytest.mark.parametrize("uri, mapping, expected", [
    ("s3://bucket/1/m", {}, "s3://bucket/1/m"),
    ("mlflow-artifacts:/1/models/m-1/artifacts", {"mlflow-artifacts:/": "s3://mlflow/"}, "s3://mlflow/1/models/m-1/artifacts"),
    ("file:///mlflow/artifacts/1/m", {"file:///mlflow/": "pvc://mlflow-data/", "file:///mlflow/artifacts/": "pvc://art/"},
     "pvc://art/1/m"),
    ("https://acct.blob.core.windows.net/c/m", {}, "https://acct.blob.core.windows.net/c/m"),
])
def test_storage_uris_kserve_reads(uri, mapping, expected):
    assert storage_uris.for_kserve(uri, storage_uris.check_map(mapping), model="m") == expected


@pytest.mark.parametrize("uri, fragment", [
    ("mlflow-artifacts:/1/m", "'mlflow-artifacts:' locations are readable only through MLflow"),
    ("file:///srv/mlflow/1/m", "'file:' locations"),
    ("models:/m/1", "'models:' locations"),
    ("s3://bucket/x; rm -rf /", "not a location it can download from"),
    ("ftp://host/m", "not a location it can download from"),
])
def test_storage_uris_kserve_cannot_read_are_refused(uri, fragment):
    with pytest.raises(InvalidRequest, match=fragment) as err:
        storage_uris.for_kserve(uri, {}, model="m (version 1)")
    assert "kserve_storage_uri_map" in str(err.value) and "Nothing was deployed" in str(err.value)


@pytest.mark.parametrize("mapping, fragment", [
    ({"": "s3://b/"}, "non-empty URI prefix"),
    ({"mlflow-artifacts:/": "file:///x/"}, "not a location KServe's storage initializer reads"),
    ({"mlflow-artifacts:/": "mlflow-artifacts:/"}, "must start with one of"),
])
def test_storage_uri_map_bad_config(mapping, fragment):
    with pytest.raises(ValueError, match=fragment):
        storage_uris.check_map(mapping)


# ---------------------------------------------------------------- through the hub service, on the cluster

class Doubler(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input * 2


@pytest.fixture
def registered_here(mlflow_server):
    """The models a test registers, deleted afterwards: the MLflow server is shared by the session, and
    other modules list alice's models."""
    made: list[str] = []
    yield made
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    for name in made:
        client.delete_registered_model(name)


def _three_versions(svc, mlflow_url: str, model: str, made: list[str]) -> None:
    """Alice registers three versions of ``model`` from a run the service made for her."""
    status, job = svc.call("POST", "/jobs", {"code": "print(1)\n", "experiment": "hub-ext-canary"})
    assert status == 201, job
    assert svc.call("POST", f"/jobs/{job['id']}/cancel")[0] == 200
    mlflow.set_tracking_uri(mlflow_url)
    try:
        for _ in range(3):  # each version from a model of its own (the newest logged one is registered)
            with mlflow.start_run(run_id=job["run_id"]):
                mlflow.pyfunc.log_model(name="model", python_model=Doubler())
            status, body = svc.call("POST", "/models", {"name": model, "run_id": job["run_id"]})
            assert status == 201, body
            if model not in made:
                made.append(model)
    finally:
        mlflow.set_tracking_uri(None)


async def _call(svc, method, path, body=None, user="alice"):
    return await asyncio.to_thread(svc.call, method, path, body, user=user)


async def _isvc(svc, name):
    return await svc.kube.get(k.INFERENCE_SERVICE, svc.namespace, name)


async def _refused_unchanged(svc, name, method, path, body, status_codes, fragment, user="alice"):
    before = await _isvc(svc, name)
    status, answer = await _call(svc, method, path, body, user=user)
    assert status in status_codes, (path, body, answer)
    assert fragment in answer["error"], (path, body, answer)
    after = await _isvc(svc, name)
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"], (path, body)
    return answer


@pytest.fixture(scope="module")
async def knative_service(kube_cluster, mlflow_server, tmp_path_factory):
    async for svc in running_stack(kube_cluster, mlflow_server, tmp_path_factory.mktemp("knative"),
                                   extra_config="c.HubMLService.kserve_deployment_mode = 'Serverless'"):
        yield svc


@pytest.mark.kube
@pytest.mark.hub
@pytest.mark.slow
async def test_standard_mode_named_canary_promote_rollback(hub_service, mlflow_server, kube_cluster,
                                                           registered_here):
    svc = hub_service
    await asyncio.to_thread(_three_versions, svc, mlflow_server.url, "canary-std", registered_here)
    # --canary on a deployment that does not exist yet: refused, nothing created
    status, body = await _call(svc, "POST", "/deployments", {"model": "canary-std/2", "name": "std",
                                                             "canary_percent": 10})
    assert status == 400 and "you have no deployment 'std'" in body["error"], body
    assert await svc.kube.get_or_none(k.INFERENCE_SERVICE, svc.namespace, "std") is None

    status, dep = await _call(svc, "POST", "/deployments", {"model": "canary-std/1", "name": "std",
                                                            "min_replicas": 2, "max_replicas": 4})
    assert status == 201 and dep["canary"] is None, dep
    isvc = await _isvc(svc, "std")
    assert isvc["metadata"]["annotations"][canary.MODE_ANNOTATION] == "Standard"
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == "hubml-mlflow" and model["storageUri"].startswith("s3://hubml-test-artifacts/"), model
    assert dep["url"] == f"http://std-predictor.{svc.namespace}.svc.cluster.local/invocations", dep

    # version 2 as a 20 % named canary: the real v0.20 CRD keeps spec.canary[] (it would prune unknown fields)
    status, dep = await _call(svc, "POST", "/deployments", {"model": "canary-std/2", "name": "std",
                                                            "canary_percent": 20})
    assert status == 201, dep
    assert dep["version"] == 1 and dep["canary"] == {"model": "canary-std/2", "version": 2, "percent": 20,
                                                     "name": "v2", "ready": None}, dep
    isvc = await _isvc(svc, "std")
    assert "canaryTrafficPercent" not in isvc["spec"]["predictor"]
    [entry] = isvc["spec"]["canary"]
    assert entry["trafficPercent"] == 20 and entry["predictor"]["name"] == "v2"
    assert entry["predictor"]["model"]["storageUri"] != isvc["spec"]["predictor"]["model"]["storageUri"]
    assert "maxReplicas" not in entry["predictor"]  # KServe's webhook refuses autoscaling fields on a canary

    # KServe's controller reports the canary Deployment available
    await svc.kube.request("PATCH", k.INFERENCE_SERVICE.path(svc.namespace, "std", "status"),
                           content_type="application/merge-patch+json", body={"status": {
                               "canaryStatuses": [{"name": "v2", "ready": True, "trafficPercent": 20}],
                               "conditions": [{"type": "Ready", "status": "True",
                                               "lastTransitionTime": "2026-01-01T00:00:00Z"},
                                              {"type": "CanaryPredictorReady", "status": "True",
                                               "lastTransitionTime": "2026-01-01T00:00:00Z"}]}})
    status, listed = await _call(svc, "GET", "/deployments")
    [row] = [d for d in listed if d["name"] == "std"]
    assert row["state"] == "ready" and row["canary"]["ready"] is True and row["canary"]["percent"] == 20, row

    # bad inputs and other users: refused, the InferenceService unchanged
    for bad in (0, 100, 150, -5, "20", True):
        await _refused_unchanged(svc, "std", "POST", "/deployments",
                                 {"model": "canary-std/2", "name": "std", "canary_percent": bad}, (400,),
                                 "canary_percent")
    await _refused_unchanged(svc, "std", "POST", "/deployments", {"model": "canary-std/3", "name": "std",
                                                                  "canary_percent": 10}, (409,),
                             "already has a canary")
    await _refused_unchanged(svc, "std", "POST", "/deployments", {"model": "canary-std/3", "name": "std"}, (409,),
                             "Promote it")
    for step in ("promote", "rollback"):
        await _refused_unchanged(svc, "std", "POST", f"/deployments/std/{step}", None, (403,),
                                 "belongs to another user", user="bob")
    status, body = await _call(svc, "POST", "/deployments/no-such/promote")
    assert status == 404, body

    # re-weight the same version, then promote: the canary's predictor becomes the stable one by name
    status, dep = await _call(svc, "POST", "/deployments", {"model": "canary-std/2", "name": "std",
                                                            "canary_percent": 50})
    assert status == 201 and dep["canary"]["percent"] == 50, dep
    status, dep = await _call(svc, "POST", "/deployments/std/promote")
    assert status == 200 and dep["version"] == 2 and dep["canary"] is None, dep
    isvc = await _isvc(svc, "std")
    assert isvc["spec"]["predictor"]["name"] == "v2" and "canary" not in isvc["spec"]
    assert isvc["spec"]["predictor"]["minReplicas"] == 2 and isvc["spec"]["predictor"]["maxReplicas"] == 4
    for step in ("promote", "rollback"):
        await _refused_unchanged(svc, "std", "POST", f"/deployments/std/{step}", None, (409,), "has no canary")

    # version 3 as a canary, rolled back: stable version 2 keeps all traffic
    status, dep = await _call(svc, "POST", "/deployments", {"model": "canary-std/3", "name": "std",
                                                            "canary_percent": 10})
    assert status == 201 and dep["canary"]["name"] == "v3", dep
    status, dep = await _call(svc, "POST", "/deployments/std/rollback")
    assert status == 200 and dep["version"] == 2 and dep["canary"] is None, dep
    isvc = await _isvc(svc, "std")
    assert "canary" not in isvc["spec"] and isvc["spec"]["predictor"]["name"] == "v2"

    # an older KServe (no spec.canary in its CRD): a Standard-mode canary is refused, nothing changed
    with kube_cluster.kserve_release("previous"):
        await _refused_unchanged(svc, "std", "POST", "/deployments", {"model": "canary-std/3", "name": "std",
                                                                      "canary_percent": 10}, (400,), "before 0.20")
    status, _ = await _call(svc, "DELETE", "/deployments/std")
    assert status == 204


@pytest.mark.kube
@pytest.mark.hub
@pytest.mark.slow
async def test_knative_mode_canary_on_the_older_crd(knative_service, mlflow_server, kube_cluster, registered_here):
    svc = knative_service
    await asyncio.to_thread(_three_versions, svc, mlflow_server.url, "canary-kn", registered_here)
    with kube_cluster.kserve_release("previous"):
        status, dep = await _call(svc, "POST", "/deployments", {"model": "canary-kn/1", "name": "kn"})
        assert status == 201, dep
        isvc = await _isvc(svc, "kn")
        assert isvc["metadata"]["annotations"][canary.MODE_ANNOTATION] == "Knative"
        status, dep = await _call(svc, "POST", "/deployments", {"model": "canary-kn/2", "name": "kn",
                                                                "canary_percent": 25})
        assert status == 201 and dep["canary"]["percent"] == 25 and dep["version"] == 1, dep
        isvc = await _isvc(svc, "kn")
        assert isvc["spec"]["predictor"]["canaryTrafficPercent"] == 25 and "canary" not in isvc["spec"]
        status, dep = await _call(svc, "POST", "/deployments/kn/rollback")
        assert status == 200 and dep["version"] == 1 and dep["canary"] is None, dep
        assert (await _isvc(svc, "kn"))["spec"]["predictor"]["canaryTrafficPercent"] == 0
        status, dep = await _call(svc, "POST", "/deployments", {"model": "canary-kn/3", "name": "kn",
                                                                "canary_percent": 40})
        assert status == 201 and dep["canary"]["version"] == 3, dep
        status, dep = await _call(svc, "POST", "/deployments/kn/promote")
        assert status == 200 and dep["version"] == 3, dep
        assert "canaryTrafficPercent" not in (await _isvc(svc, "kn"))["spec"]["predictor"]
    status, _ = await _call(svc, "DELETE", "/deployments/kn")
    assert status == 204


@pytest.mark.kube
@pytest.mark.hub
@pytest.mark.slow
async def test_unreadable_model_location_is_refused_before_anything_exists(kube_cluster, mlflow_server,
                                                                          tmp_path_factory, registered_here):
    """Without kserve_storage_uri_map the registry's mlflow-artifacts:/ location cannot reach KServe."""
    async for svc in running_stack(kube_cluster, mlflow_server, tmp_path_factory.mktemp("nomap"),
                                   extra_config="c.HubMLService.kserve_storage_uri_map = {}"):
        await asyncio.to_thread(_three_versions, svc, mlflow_server.url, "canary-nomap", registered_here)
        status, body = await _call(svc, "POST", "/deployments", {"model": "canary-nomap", "name": "nomap"})
        assert status == 400 and "KServe cannot fetch canary-nomap" in body["error"], body
        assert "kserve_storage_uri_map" in body["error"]
        assert await svc.kube.get_or_none(k.INFERENCE_SERVICE, svc.namespace, "nomap") is None
        assert await svc.kube.get_or_none(k.DEPLOYMENT, svc.namespace, "nomap") is None


def test_copy_is_deep():  # the rollout steps never mutate what they were given
    existing = _obj(1)
    frozen = copy.deepcopy(existing)
    new, rec = _new(2)
    canary.with_canary(existing, new, rec, mode="Standard", percent=20, has_canary_schema=True)
    canary.replacement(existing, new, rec, mode="Standard")
    assert existing == frozen
