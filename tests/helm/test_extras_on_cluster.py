"""hubml-extras applied to the real test control plane, and its RBAC put to work.

The chart is rendered by helm for a fresh namespace, applied with server-side
apply (a dry run first, then for real) as cluster admin, and then:

* as the hub_ext ServiceAccount (a TokenRequest token, exactly what the pod
  would hold), hub_ext's own Kubernetes client creates a training job the way
  hub_ext submits one (Indexed Job, then ConfigMap, NetworkPolicy and headless
  Service owned by it, then the resume patch), a PyTorchJob, and the serving
  objects (InferenceService; Deployment + Service + HPA), lists nodes, reads
  pods and logs, and deletes what it made;
* the same identity cannot read Secrets, touch RBAC, create bare pods or act in
  any other namespace (SelfSubjectAccessReview and real requests);
* z2jh's hub ServiceAccount gains node and pod reads for the spawner's
  informer, and nothing it could write with.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.parse
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from hubml_testing.jupyterhub import json_call, spawn_page
from hubml_testing.helm_values import EXTRAS_CHART, hub_fixture_config, merged_values, role_scopes_for_user, run_helm
from hubml_testing.kube import service_account_kubeconfig
from hubml_testing.kube_rest import Rest
from hubml_testing.ports import free_port, wait_http

pytestmark = [pytest.mark.kube, pytest.mark.slow]

# kind -> (API prefix, plural, namespaced) for what the chart renders
KINDS = {
    "ServiceAccount": ("/api/v1", "serviceaccounts", True),
    "Service": ("/api/v1", "services", True),
    "ConfigMap": ("/api/v1", "configmaps", True),
    "PersistentVolumeClaim": ("/api/v1", "persistentvolumeclaims", True),
    "Deployment": ("/apis/apps/v1", "deployments", True),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies", True),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles", True),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings", True),
    "ClusterRole": ("/apis/rbac.authorization.k8s.io/v1", "clusterroles", False),
    "ClusterRoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "clusterrolebindings", False),
    # KServe's own CRD (v0.20, as the test control plane serves it) validates the chart's runtime
    "ServingRuntime": ("/apis/serving.kserve.io/v1alpha1", "servingruntimes", True),
}


def object_path(doc: dict) -> str:
    if doc["kind"] not in KINDS:
        raise AssertionError(f"the test does not know where {doc['kind']} lives; add it to KINDS")
    prefix, plural, namespaced = KINDS[doc["kind"]]
    ns = f"/namespaces/{doc['metadata']['namespace']}" if namespaced else ""
    return f"{prefix}{ns}/{plural}/{doc['metadata']['name']}"


def server_side_apply(rest: Rest, doc: dict, *, dry_run: bool) -> dict:
    query = {"fieldManager": "hubml-helm-test", "force": "true"}
    if dry_run:
        query["dryRun"] = "All"
    status, body = rest.request("PATCH", object_path(doc) + "?" + urllib.parse.urlencode(query), doc,
                                content_type="application/apply-patch+yaml")
    assert status in (200, 201), f"server-side apply of {doc['kind']} {doc['metadata']['name']}: {status} {body}"
    return body


def can_i(rest: Rest, verb: str, resource: str, *, namespace: str = "", group: str = "",
          subresource: str = "", name: str = "") -> bool:
    attrs = {"verb": verb, "resource": resource, "group": group, "namespace": namespace}
    if subresource:
        attrs["subresource"] = subresource
    if name:
        attrs["name"] = name
    status, body = rest.request("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", {
        "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": attrs}})
    assert status == 201, body
    return bool(body["status"].get("allowed"))


def token_of(kubeconfig: Path) -> str:
    return yaml.safe_load(kubeconfig.read_text())["users"][0]["user"]["token"]


@pytest.fixture
def rendered(kube_namespace):
    proc = run_helm("template", "hubml-extras", str(EXTRAS_CHART), "--namespace", kube_namespace,
                    "--set", "jupyterhub.release=jhub",
                    "--api-versions", "serving.kserve.io/v1alpha1/ServingRuntime")
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert any(d["kind"] == "ServingRuntime" for d in docs), "the chart renders its KServe runtime where KServe is"
    return docs


@pytest.fixture
async def applied(kube_cluster, kube_api, kube_namespace, rendered):
    """The chart applied for real into the test namespace (cluster objects removed afterwards)."""
    from kubernetes_asyncio import client

    # what zero-to-jupyterhub would have created: the hub's ServiceAccount
    await client.CoreV1Api(kube_api).create_namespaced_service_account(
        kube_namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="hub")))
    admin = kube_cluster.rest
    cluster_scoped = [d for d in rendered if not KINDS[d["kind"]][2]]
    try:
        for doc in rendered:
            server_side_apply(admin, doc, dry_run=True)
        # a dry run creates nothing
        for doc in rendered:
            assert admin.request("GET", object_path(doc))[0] == 404, f"dry run created {doc['kind']}"
        for doc in rendered:
            server_side_apply(admin, doc, dry_run=False)
        yield rendered
    finally:
        for doc in cluster_scoped:
            admin.request("DELETE", object_path(doc))


async def test_every_rendered_object_is_accepted(applied, kube_cluster):
    admin = kube_cluster.rest
    for doc in applied:
        status, live = admin.request("GET", object_path(doc))
        assert status == 200, f"{doc['kind']} {doc['metadata']['name']} missing after apply"
        assert live["metadata"]["labels"]["app.kubernetes.io/part-of"] == "hubml"


async def test_hub_ext_identity_does_its_work(applied, kube_cluster, kube_api, kube_namespace, tmp_path):
    from hubml.hub_ext import kube as k
    from hubml.hub_ext import ownership, rbac, serving_objects, training_objects

    ns = kube_namespace
    kubeconfig = await service_account_kubeconfig(kube_cluster, kube_api, ns, "hubml-hub-ext",
                                                  tmp_path / "hub-ext.kubeconfig")
    kube = await k.Kube.connect(kubeconfig=str(kubeconfig), retries=0)
    try:
        # training, as hub_ext submits it: suspended Job, its dependants, resume
        plan = training_objects.TrainingPlan(job_id="train-rbac1", namespace=ns, username="alice",
                                    image="ghcr.io/hubml/singleuser:0.1.0", code="print('hi')\n",
                                    workers=2).validate()
        job = await kube.create(training_objects.indexed_job(plan))
        owner = ownership.owner_reference(job)
        for dep in (training_objects.code_config_map(plan, owner),
                    training_objects.training_network_policy(plan, training_objects.mlflow_egress_from_uri("http://hubml-mlflow:5000"),
                                                    owner),
                    training_objects.rendezvous_service(plan, owner)):
            await kube.create(dep)
        await kube.patch(k.JOB, ns, plan.job_id, {"spec": {"suspend": False}})
        assert await kube.list(k.POD, ns, labels={ownership.LABEL_JOB: plan.job_id}) is not None
        assert await kube.list(k.NODE, None), "the capacity reader must list nodes"

        pj_plan = training_objects.TrainingPlan(job_id="train-rbac2", namespace=ns, username="alice",
                                       image="ghcr.io/hubml/singleuser:0.1.0", code="print('hi')\n",
                                       workers=2).validate()
        await kube.create(training_objects.pytorch_job(pj_plan))
        await kube.create(training_objects.train_job(replace(pj_plan, job_id="train-rbac3")))

        serve = serving_objects.ServingPlan(name="iris", namespace=ns, username="alice", model="iris-clf@champion",
                                    model_name="iris-clf", version=1, storage_uri="s3://hubml-artifacts/1/abc/artifacts/model",
                                    image="ghcr.io/mlflow/mlflow:v3.17.2", max_replicas=2).validate()
        await kube.create(serving_objects.inference_service(serve))
        deployment = await kube.create(serving_objects.scoring_deployment(serve))
        owner = ownership.owner_reference(deployment)
        await kube.create(serving_objects.scoring_service(serve, owner))
        await kube.create(serving_objects.scoring_hpa(serve, owner))

        # and it cleans up after itself
        for res, name in ((k.JOB, plan.job_id), (k.PYTORCH_JOB, pj_plan.job_id), (k.TRAIN_JOB, "train-rbac3"),
                          (k.INFERENCE_SERVICE, "iris"),
                          (k.DEPLOYMENT, "iris")):
            await kube.delete(res, ns, name, propagation="Background")
    finally:
        await kube.close()


def needed_by_hub_ext(namespace: str) -> list[tuple[str, str, str, str]]:
    """(verb, resource, group, subresource) hub_ext says it needs (hubml.hub_ext.rbac.service_rbac)."""
    from hubml.hub_ext.rbac import service_rbac

    out = []
    for rule in service_rbac(namespace)[0]["rules"]:
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                base, _, sub = res.partition("/")
                out.extend((verb, base, group, sub) for verb in rule["verbs"])
    return out


# what hub_ext must never be able to do in its namespace
HUB_EXT_DENIED = [
    ("get", "secrets", "", ""), ("list", "secrets", "", ""), ("create", "pods", "", ""),
    ("delete", "pods", "", ""), ("create", "pods", "", "exec"),
    ("create", "rolebindings", "rbac.authorization.k8s.io", ""),
    ("create", "roles", "rbac.authorization.k8s.io", ""), ("create", "serviceaccounts", "", "token"),
    ("update", "resourcequotas", "", ""), ("delete", "persistentvolumeclaims", "", ""),
    ("create", "serviceaccounts", "", ""), ("update", "configmaps", "", ""),
    # TrainJobs yes (training_flavour 'trainjob'), the runtimes that define their pods no
    ("create", "trainingruntimes", "trainer.kubeflow.org", ""),
    ("patch", "trainingruntimes", "trainer.kubeflow.org", ""),
]


async def test_hub_ext_identity_is_least_privilege(applied, kube_cluster, kube_api, kube_namespace, tmp_path):
    ns = kube_namespace
    kubeconfig = await service_account_kubeconfig(kube_cluster, kube_api, ns, "hubml-hub-ext",
                                                  tmp_path / "hub-ext.kubeconfig")
    me = Rest(kube_cluster.server, token_of(kubeconfig), kube_cluster.ca_file)
    needed = needed_by_hub_ext(ns)
    assert len(needed) > 20
    denied = [a for a in needed if not can_i(me, a[0], a[1], group=a[2], subresource=a[3], namespace=ns)]
    assert denied == [], f"hub_ext lacks rights it needs: {denied}"
    allowed = [a for a in HUB_EXT_DENIED if can_i(me, a[0], a[1], group=a[2], subresource=a[3], namespace=ns)]
    assert allowed == [], f"hub_ext holds rights it must not: {allowed}"
    # nothing in any other namespace, nothing cluster-wide but reading nodes and pods
    for other in ("default", "kube-system"):
        assert not can_i(me, "create", "jobs", group="batch", namespace=other)
        assert not can_i(me, "create", "configmaps", namespace=other)
    assert can_i(me, "list", "nodes") and can_i(me, "watch", "pods")
    assert not can_i(me, "update", "nodes") and not can_i(me, "create", "namespaces")
    assert not can_i(me, "list", "secrets")
    # and real requests answer the same
    assert me.request("GET", f"/api/v1/namespaces/{ns}/secrets")[0] == 403
    assert me.request("GET", "/api/v1/nodes")[0] == 200
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {}}
    assert me.request("POST", "/api/v1/namespaces/default/configmaps?dryRun=All", cm)[0] == 403
    assert me.request("POST", f"/api/v1/namespaces/{ns}/configmaps?dryRun=All", cm)[0] == 201


async def test_hub_service_account_gains_reads_only(applied, kube_cluster, kube_api, kube_namespace, tmp_path):
    ns = kube_namespace
    kubeconfig = await service_account_kubeconfig(kube_cluster, kube_api, ns, "hub", tmp_path / "hub.kubeconfig")
    hub = Rest(kube_cluster.server, token_of(kubeconfig), kube_cluster.ca_file)
    for verb in ("get", "list", "watch"):
        assert can_i(hub, verb, "nodes"), f"the spawner's informer needs to {verb} nodes"
        assert can_i(hub, verb, "pods"), f"the spawner's informer needs to {verb} pods in every namespace"
    assert can_i(hub, "list", "resourcequotas", namespace=ns), "the spawner's quota check reads ResourceQuotas"
    assert not can_i(hub, "list", "resourcequotas", namespace="default")
    for verb, resource, group in (("create", "jobs", "batch"), ("update", "nodes", ""), ("delete", "pods", ""),
                                  ("update", "resourcequotas", ""),
                                  ("create", "inferenceservices", "serving.kserve.io"), ("get", "secrets", "")):
        assert not can_i(hub, verb, resource, group=group, namespace=ns), f"hub must not {verb} {resource}"
    status, nodes = hub.request("GET", "/api/v1/nodes")
    assert status == 200 and any(n["metadata"]["name"].startswith("gpu-") for n in nodes["items"])


# ---- hub_ext itself: the chart's config and RBAC, the values' scopes, a real hub ----------


def start_hub_ext(tmp: Path, config: dict, *, token: str, hub, port: int) -> tuple[subprocess.Popen, Path]:
    path = tmp / "hubml_service_config.json"
    path.write_text(json.dumps(config))
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update({
        "JUPYTERHUB_API_TOKEN": token,
        "JUPYTERHUB_API_URL": hub.hub_url + "api",
        "JUPYTERHUB_SERVICE_NAME": "hubml",
        "JUPYTERHUB_SERVICE_PREFIX": "/services/hubml/",
        "JUPYTERHUB_SERVICE_URL": f"http://127.0.0.1:{port}",
        "HOME": str(tmp),
    })
    log = tmp / "hub_ext.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "hubml.hub_ext", f"--config={path}"], cwd=tmp, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


call = json_call  # token-authenticated JSON request, from the shared hub fixture module


@pytest.mark.hub
async def test_hub_ext_works_with_the_values_scopes_and_the_chart_rbac(
        applied, kube_cluster, kube_api, kube_namespace, mlflow_server, jupyterhub_factory, tmp_path):
    """hubml's service as installed: its config from the chart's ConfigMap, the RBAC of
    the chart (TokenRequest token of hubml-hub-ext), its hub token holding the roles
    of values.yaml; a user's notebook token (the values' `server` role) submits a
    training job, another user cannot see it, a token without hubml's scopes is refused."""
    ns = kube_namespace
    values = merged_values()
    kubeconfig = await service_account_kubeconfig(kube_cluster, kube_api, ns, "hubml-hub-ext",
                                                  tmp_path / "hub-ext.kubeconfig")
    chart_config = json.loads(next(d for d in applied if d["kind"] == "ConfigMap"
                                   and d["metadata"]["name"] == "hubml-hub-ext-config")
                              ["data"]["hubml_service_config.json"])
    assert chart_config["HubMLService"]["namespace"] == ns
    port, token = free_port(), secrets.token_hex(16)
    hub = jupyterhub_factory(config=hub_fixture_config(values, {"hubml": token, "hubml-culler": secrets.token_hex(16)},
                                                       urls={"hubml": f"http://127.0.0.1:{port}"}),
                             users=["alice", "bob"])
    config = {"HubMLService": {
        **chart_config["HubMLService"],
        # where this test's pieces are: the local MLflow server (training pods keep
        # the chart's in-cluster URL), the ServiceAccount's kubeconfig, a local port
        "mlflow_tracking_uri": mlflow_server.url,
        "mlflow_pod_tracking_uri": chart_config["HubMLService"]["mlflow_tracking_uri"],
        "kubeconfig": str(kubeconfig),
        "bind_url": f"http://127.0.0.1:{port}",
        # kwok keeps the simulated workers running; no training operator runs here
        "extra_pod_annotations": {"kwok.hubml.io/outcome": "run"},
        "training_flavour": "job",
        "default_image": "ghcr.io/hubml/singleuser:0.1.0",
    }}
    proc, log = start_hub_ext(tmp_path, config, token=token, hub=hub, port=port)
    try:
        base = hub.url + "services/hubml/api/v1"
        if not wait_http(base + "/openapi.json", timeout=90, alive=lambda: proc.poll() is None,
                         accept=lambda c: c == 200):
            pytest.fail(f"hub_ext did not start (exit {proc.poll()}):\n{log.read_text()[-3000:]}", pytrace=False)
        # what a notebook server's $JUPYTERHUB_API_TOKEN holds under values.yaml (minus the server itself)
        alice = hub.create_token("alice", scopes=[s for s in role_scopes_for_user(values, "server", "alice")
                                                 if not s.startswith("access:servers")])
        bob = hub.create_token("bob", scopes=[s for s in role_scopes_for_user(values, "server", "bob")
                                             if not s.startswith("access:servers")])
        plain = hub.create_token("alice", scopes=["read:users:name!user=alice"])

        status, job = call(base + "/jobs", alice, "POST", {"code": "print('hello from rank', 0)\n", "workers": 2})
        assert status == 201, f"{job}\n{log.read_text()[-3000:]}"
        job_id = job["id"]
        admin = kube_cluster.rest
        labels = urllib.parse.urlencode({"labelSelector": f"hubml.io/job={job_id}"})
        for path in (f"/apis/batch/v1/namespaces/{ns}/jobs", f"/api/v1/namespaces/{ns}/configmaps",
                     f"/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies", f"/api/v1/namespaces/{ns}/services"):
            status, listed = admin.request("GET", f"{path}?{labels}")
            assert status == 200 and len(listed["items"]) == 1, f"{path}: {listed}"
            assert listed["items"][0]["metadata"]["labels"]["hubml.io/user"] == "alice"

        assert call(f"{base}/jobs/{job_id}", alice)[0] == 200
        assert call(f"{base}/jobs/{job_id}", bob)[0] in (403, 404)
        assert call(f"{base}/jobs", plain)[0] == 403
        status, cancelled = call(f"{base}/jobs/{job_id}/cancel", alice, "POST")
        assert status == 200, cancelled
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


# ---- the spawner in the hub pod: z2jh's hub Role plus what hubml-extras adds ------------

# The Role zero-to-jupyterhub gives its hub ServiceAccount (jupyterhub/templates/hub/rbac.yaml).
Z2JH_HUB_RULES = [
    {"apiGroups": [""], "resources": ["pods", "persistentvolumeclaims", "secrets", "services"],
     "verbs": ["get", "watch", "list", "create", "delete"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["get", "watch", "list"]},
]


def spawn_form(hub, user: str) -> str:
    """/hub/spawn as ``user`` sees it after a real login (dummy authenticator)."""
    return spawn_page(hub.url, user)


@pytest.mark.hub
async def test_spawner_works_under_the_hub_service_account(
        applied, kube_cluster, kube_api, kube_namespace, jupyterhub_factory, tmp_path):
    """HubMLSpawner with the full-GPU overlay's profiles, authenticated as the hub's
    ServiceAccount holding z2jh's Role plus hubml-extras' grants: the informer reads
    nodes and pods (availability in the form), and a server's pod is created."""
    ns = kube_namespace
    admin = kube_cluster.rest
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "hub", "namespace": ns}, "rules": Z2JH_HUB_RULES}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": "hub", "namespace": ns},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "hub"},
               "subjects": [{"kind": "ServiceAccount", "name": "hub", "namespace": ns}]}
    admin.must("POST", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles", role)
    admin.must("POST", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings", binding)
    kubeconfig = await service_account_kubeconfig(kube_cluster, kube_api, ns, "hub", tmp_path / "hub.kubeconfig")
    values = merged_values("full-gpu")
    hub = jupyterhub_factory(
        config={
            "JupyterHub.spawner_class": values["hub"]["config"]["JupyterHub"]["spawner_class"],
            "HubMLSpawner.gpu_profiles": values["hub"]["config"]["HubMLSpawner"]["gpu_profiles"],
            "HubMLSpawner.namespace": ns,
            "HubMLSpawner.image": f"{values['singleuser']['image']['name']}:{values['singleuser']['image']['tag']}",
            "HubMLSpawner.start_timeout": 90,
            "HubMLSpawner.http_timeout": 300,
        },
        users=["alice"], groups={"ml-team": ["alice"]},
        env={"KUBECONFIG": str(kubeconfig)},
    )
    html = spawn_form(hub, "alice")
    assert 'value="a100x4"' in html, html[:2000]
    a100 = html[html.index('value="a100"'):]
    assert "free of 16" in a100[: a100.index("</label>")], "the informer must see both 8-GPU A100 nodes"

    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # the simulated pod never answers HTTP, so the spawn request stays open
        pending = pool.submit(hub.api, "POST", "/users/alice/server", {"profile": "a100"}, timeout=120)
        labels = urllib.parse.urlencode({"labelSelector": "hub.jupyter.org/username=alice"})
        deadline = time.monotonic() + 90
        pods = []
        while not pods:
            assert time.monotonic() < deadline, f"no pod for alice:\n{hub.log_tail()}"
            pods = admin.must("GET", f"/api/v1/namespaces/{ns}/pods?{labels}")["items"]
            time.sleep(0.2)
        limits = pods[0]["spec"]["containers"][0]["resources"]["limits"]
        assert limits.get("nvidia.com/gpu") == "1"
        hub.api("DELETE", "/users/alice/server")
        pending.result(timeout=150)
    assert "Forbidden" not in hub.log_tail(400), hub.log_tail(80)
