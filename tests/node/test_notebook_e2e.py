"""The whole notebook flow from a kernel in a real single-user pod (issue 11).

JupyterHub spawns alice's server with HubMLSpawner on the real node; her server's token
gets hubml's custom scopes through the `server` role (as helm-values/values.yaml grants
them) and finds the hub service through HUBML_SERVICE_URL (singleuser.extraEnv there).
The service runs from the hub image. From the kernel in that pod: `%%train --workers 2`
(two more pods, DDP over gloo, MLflow), `%register_model`, `%deploy` (Deployment +
Service + HPA running the serving image), `%predict` (posted from the pod to the
Service's cluster DNS name, as a notebook does) and `%undeploy`. The prediction is
checked against the registered model loaded here on the host."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hubml.hub_ext import kube as k
from hubml.hub_ext import ownership
from hubml_testing.kube import wait_for
from hubml_testing.kube_node import GATEWAY_IP
from hubml_testing.pod_kernel import execute, start_kernel
from hubml_testing.ports import free_port
from hubml_testing.real_pods import REAL_PROFILE, hub_stack
from hubml_testing.train_cells import DDP_CELL

_stack = hub_stack()

pytestmark = [pytest.mark.kube, pytest.mark.hub, pytest.mark.node, pytest.mark.slow, pytest.mark.timeout(1200)]

VALUES = yaml.safe_load((Path(__file__).parents[2] / "helm-values" / "values.yaml").read_text())
#: the chart's `server` role, as installed: what a notebook server's token may do
SERVER_ROLE = {"name": "server", "scopes": VALUES["hub"]["loadRoles"]["server"]["scopes"]}
ROW = [1.0, -1.0, 2.0, 0.5]
# as the README's tour logs a model: with an input example, so its signature (float32 tensor)
# lets the scoring server cast JSON numbers (float64) to what the model takes
TRAIN_CELL = DDP_CELL.replace('pip_requirements=["torch"])', 'pip_requirements=["torch"], input_example=x[:2].numpy())')
assert TRAIN_CELL != DDP_CELL


@pytest.fixture
async def notebook_stack(kube_cluster, kube_namespace, singleuser_on_node, serving_on_node, in_hub_image, pod_mlflow,
                         tmp_path):
    port = free_port(GATEWAY_IP)
    service_url = f"http://{GATEWAY_IP}:{port}/services/hubml/"
    hub_config = {
        "JupyterHub.spawner_class": "hubml",
        "JupyterHub.hub_ip": GATEWAY_IP,  # the pod reaches the hub API at the node's address
        "JupyterHub.load_roles": [SERVER_ROLE],
        "HubMLSpawner.namespace": kube_namespace,
        "HubMLSpawner.image": singleuser_on_node,
        "HubMLSpawner.image_pull_policy": "Never",
        "HubMLSpawner.start_timeout": 300,
        "HubMLSpawner.http_timeout": 300,
        "HubMLSpawner.gpu_profiles": [{**REAL_PROFILE, "default": True}],
        "HubMLSpawner.environment": {"HUBML_SERVICE_URL": service_url, "HUBML_LIVE_VIEW": "text"},
    }
    extra = "\n".join([
        f"c.HubMLService.profiles = {[*_stack.PROFILES, REAL_PROFILE]!r}",
        f"c.HubMLService.default_image = {singleuser_on_node!r}",
        f"c.HubMLService.serving_image = {serving_on_node!r}",
        "c.HubMLService.serving_flavour = 'deployment'",
        "c.HubMLService.extra_pod_annotations = {}",
    ])
    try:
        svc = await _stack.start_stack(kube_cluster, pod_mlflow.url, tmp_path, users=["alice"], extra_config=extra,
                                       launcher=in_hub_image, hub_config=hub_config, service_host=GATEWAY_IP,
                                       service_port=port, hub_env={"KUBECONFIG": str(kube_cluster.kubeconfig)})
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield svc
    finally:
        await _stack.stop_stack(svc)


def _numbers(value: Any) -> list[float]:
    """Every number in a prediction (a list of rows, or a dict of columns), in order."""
    if isinstance(value, dict):
        return [x for v in value.values() for x in _numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in _numbers(v)]
    return [float(value)]


async def _serving_objects(svc: Any, name: str) -> list[str]:
    found = []
    for res in (k.DEPLOYMENT, k.SERVICE, k.HPA):
        for obj in await svc.kube.list(res, svc.namespace, labels={ownership.LABEL_DEPLOYMENT: name}):
            found.append(f"{res.kind}/{obj['metadata']['name']}")
    return found


async def test_train_register_deploy_predict_undeploy_from_a_notebook_pod(notebook_stack, real_node, pod_mlflow,
                                                                         kube_cluster, kube_namespace):
    svc, hub = notebook_stack, notebook_stack.hub
    await asyncio.to_thread(hub.start_server, "alice", options={"profile": "cpu-real"}, timeout=300)
    pods = kube_cluster.rest.must("GET", f"/api/v1/namespaces/{kube_namespace}/pods")["items"]
    assert [p["spec"]["nodeName"] for p in pods] == [real_node.name]

    ws = await asyncio.to_thread(start_kernel, hub.url, "alice", hub.create_token("alice", scopes=["access:servers!user=alice"]))
    out, status = await execute(ws, "%%train --workers 2 --profile cpu-real\n" + TRAIN_CELL, timeout=600)
    assert status == "ok", out[-4000:]
    assert "[0] done rank 0" in out and "[1] done rank 1" in out and "succeeded" in out, out[-4000:]

    out, status = await execute(ws, "%register_model --name e2e-linear")
    assert status == "ok" and "Registered e2e-linear version 1" in out, out

    out, status = await execute(ws, "%deploy e2e-linear/1 --profile cpu-real --timeout 400", timeout=460)
    assert status == "ok", out
    assert sorted(o.split("/")[0] for o in await _serving_objects(svc, "e2e-linear")) == [
        "Deployment", "HorizontalPodAutoscaler", "Service"], out
    serving = await svc.kube.list(k.POD, svc.namespace, labels={ownership.LABEL_DEPLOYMENT: "e2e-linear"})
    assert {p["spec"]["nodeName"] for p in serving} == {real_node.name}

    out, status = await execute(ws, f"y = %predict e2e-linear {[ROW]!r}\nimport json; print('predicted', json.dumps(y))")
    assert status == "ok", out
    got = _numbers(json.loads(out.split("predicted", 1)[1].strip().splitlines()[0]))
    import mlflow.pytorch
    import torch

    mlflow.set_tracking_uri(pod_mlflow.url)
    model = mlflow.pytorch.load_model("models:/e2e-linear/1")
    expected = model(torch.tensor([ROW])).detach().numpy().ravel().tolist()
    assert len(got) == 1 and abs(got[0] - expected[0]) < 1e-4, (out, expected)

    out, status = await execute(ws, "%undeploy e2e-linear")
    assert status == "ok", out

    async def gone() -> bool:
        left = await _serving_objects(svc, "e2e-linear")
        pods_left = await svc.kube.list(k.POD, svc.namespace, labels={ownership.LABEL_DEPLOYMENT: "e2e-linear"})
        return not left and not pods_left

    await wait_for(gone, timeout=120, what="every serving object and pod of e2e-linear removed")
    hub.stop_server("alice", timeout=120)
