"""Shared fixtures of the hub service tests: a profile catalogue shaped like the test cluster.

The catalogue matches the simulated nodes of dev/kube/topology.yaml. ``start_stack``
(also used by bench/hub_ext_*.py) starts JupyterHub + the hub service against the
test control plane and an MLflow server; ``hub_service`` is its module fixture.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hubml.profile_config import load_catalogue
from hubml_testing.jupyterhub import RunningHub, start_hub
from hubml_testing.kube import service_account_kubeconfig, wait_for
from hubml_testing.ports import free_port, wait_http

PROFILES = [
    {"name": "cpu", "display": "CPU", "cpu": 1, "memory": "1G", "default": True},
    {"name": "a100", "display": "1 x A100", "gpu": {"model": "A100-SXM4-80GB", "count": 2},
     "cpu": 4, "memory": "8G"},
    {"name": "mig-small", "display": "A100 MIG 1g.10gb", "gpu": {"model": "A100-SXM4-80GB", "mig": "1g.10gb"},
     "cpu": 1, "memory": "2G"},
    {"name": "t4-shared", "display": "T4 share", "gpu": {"model": "Tesla-T4", "shared": True}, "cpu": 1,
     "memory": "2G"},
    {"name": "team-only", "display": "Team A100", "gpu": {"model": "A100-SXM4-80GB", "count": 1},
     "groups": ["ml-team"], "images": {"torch": "quay.io/hubml/torch:2.15"}},
]


@pytest.fixture
def catalogue():
    return load_catalogue(PROFILES)


@pytest.fixture
def policy(catalogue):
    from hubml.hub_ext.policy import Policy

    return Policy(namespace="hubml-jobs", catalogue=catalogue, default_image="quay.io/hubml/runtime:1",
                  serving_image="quay.io/hubml/serving:1", allowed_images=(r"^registry\.example\.org/ml/.+$",),
                  max_gpus_per_user=8, max_active_jobs_per_user=3, max_workers=16)


# --------------------------------------------------------------------------- the real stack
#
# JupyterHub (with configurable-http-proxy) + the hub service as a JupyterHub
# service + the test control plane (kwok nodes) + an MLflow server. The service
# runs as its own process with a ServiceAccount kubeconfig bound to exactly the
# RBAC of rbac.service_rbac, so the tests also prove that RBAC is enough.

REPO_ROOT = Path(__file__).resolve().parents[2]
SCOPES = ["custom:hubml:jobs", "custom:hubml:models", "custom:hubml:deployments"]
HUB_CONFIG_EXTRA = {
    "JupyterHub.custom_scopes": {
        "custom:hubml:jobs": {"description": "Run, read and cancel your own hubml training jobs."},
        "custom:hubml:models": {"description": "Register and list your own models."},
        "custom:hubml:deployments": {"description": "Deploy, read and remove your own model deployments."},
    },
}


@dataclass
class HubService:
    """The running stack, seen from a test."""

    hub: RunningHub
    url: str                 # public base of the service: http://127.0.0.1:PORT/services/hubml/
    namespace: str
    kube: Any                # hubml.hub_ext.kube.Kube with admin rights (to inspect and drive the cluster)
    api: Any                 # kubernetes_asyncio ApiClient (admin), for hubml_testing.kube helpers
    proc: subprocess.Popen
    log_path: Path
    tokens: dict[str, str] = field(default_factory=dict)

    def call(self, method: str, path: str, body: Any = None, *, user: str = "alice", token: str | None = None,
             raw: bytes | None = None, timeout: float = 60) -> tuple[int, Any]:
        """Call ``api/v1<path>`` through the proxy; returns ``(status, parsed JSON)``; never raises on HTTP errors."""
        tok = token if token is not None else self.tokens[user]
        headers = {"Authorization": f"token {tok}"} if tok else {}
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        if data is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + "api/v1" + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, content = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, content = e.code, e.read()
        try:
            return status, json.loads(content) if content else None
        except ValueError:
            return status, content.decode("utf8", "replace")

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


async def _apply(kube, obj: dict) -> None:
    from hubml.hub_ext import kube as k

    group_version = obj["apiVersion"]
    plural = {"Role": "roles", "RoleBinding": "rolebindings", "ClusterRole": "clusterroles",
              "ClusterRoleBinding": "clusterrolebindings", "ServiceAccount": "serviceaccounts"}[obj["kind"]]
    base = f"/apis/{group_version}" if "/" in group_version else f"/api/{group_version}"
    ns = obj["metadata"].get("namespace")
    path = f"{base}/namespaces/{ns}/{plural}" if ns else f"{base}/{plural}"
    try:
        await kube.request("POST", path, body=obj)
    except k.Conflict:
        pass


#: How the service process starts: (its arguments after the interpreter, its JUPYTERHUB_* environment,
#: the folder holding its config and kubeconfig) -> the command line. None: this venv's Python.
Launcher = Callable[[list[str], dict[str, str], Path], list[str]]


def start_service(tmp: Path, hub_port_token: tuple[int, str], hub: RunningHub, namespace: str, kubeconfig: Path,
                  mlflow_uri: str, extra_config: str = "", launcher: Launcher | None = None,
                  host: str = "127.0.0.1") -> tuple[subprocess.Popen, Path]:
    port, token = hub_port_token
    cfg = tmp / "hubml_service_config.py"
    cfg.write_text("\n".join([
        "c = get_config()  # noqa",
        f"c.HubMLService.namespace = {namespace!r}",
        f"c.HubMLService.kubeconfig = {str(kubeconfig)!r}",
        f"c.HubMLService.profiles = {PROFILES!r}",
        f"c.HubMLService.mlflow_tracking_uri = {mlflow_uri!r}",
        "c.HubMLService.extra_pod_annotations = {'kwok.hubml.io/outcome': 'run'}",
        "c.HubMLService.default_image = 'quay.io/hubml/runtime:1'",
        "c.HubMLService.training_flavour = 'job'",
        "c.HubMLService.crd_cache_seconds = 0.0",
        # the tracking server proxies its artifacts (mlflow-artifacts:/); in a cluster they would sit in an
        # object store KServe's storage initializer reads, which is what this mapping says
        "c.HubMLService.kserve_storage_uri_map = {'mlflow-artifacts:/': 's3://hubml-test-artifacts/'}",
        extra_config,
    ]) + "\n")
    log_path = tmp / "hubml-service.log"
    service_env = {
        "JUPYTERHUB_API_TOKEN": token,
        "JUPYTERHUB_API_URL": hub.hub_url + "api",
        "JUPYTERHUB_SERVICE_NAME": "hubml",
        "JUPYTERHUB_SERVICE_PREFIX": "/services/hubml/",
        "JUPYTERHUB_SERVICE_URL": f"http://{host}:{port}",
    }
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(service_env)
    args = ["-m", "hubml.hub_ext", f"--config={cfg}"]
    argv = [sys.executable, *args] if launcher is None else launcher(args, service_env, tmp)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log_path


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


async def start_stack(cluster, mlflow_url: str, tmp: Path, *, users: list[str] = ("alice", "bob", "carol"),
                      extra_config: str = "", launcher: Launcher | None = None, hub_config: dict[str, Any] | None = None,
                      service_host: str = "127.0.0.1", service_port: int | None = None,
                      hub_env: dict[str, str] | None = None) -> HubService:
    """Start JupyterHub + the hub service against ``cluster`` and an MLflow server (also used by bench/).

    Creates a fresh namespace, the service's ServiceAccount and exactly the RBAC of
    ``rbac.service_rbac``, and a kubeconfig for that ServiceAccount. Call
    ``stop_stack`` to undo everything. ``hub_config`` adds hub settings (its
    ``load_roles`` extend the stack's), ``hub_env`` the hub's environment (a
    spawner's KUBECONFIG); ``service_host``/``service_port`` say where the service
    listens (the real-node tests use the node's address, which notebook pods
    reach); ``launcher`` how its process starts (default: this venv's Python).
    """
    from hubml.hub_ext import kube as k
    from hubml.hub_ext.rbac import service_rbac

    namespace = f"hubml-{secrets.token_hex(3)}"
    api = cluster.api_client()
    kube = k.Kube(api)
    await kube.request("POST", "/api/v1/namespaces",
                       body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    await _apply(kube, {"apiVersion": "v1", "kind": "ServiceAccount",
                        "metadata": {"name": "hubml", "namespace": namespace}})
    for obj in service_rbac(namespace):
        await _apply(kube, obj)
    kubeconfig = await service_account_kubeconfig(cluster, api, namespace, "hubml", tmp / "kubeconfig")
    svc_port, svc_token = service_port or free_port(service_host), secrets.token_hex(16)
    hub_config = dict(hub_config or {})
    hub = start_hub(tmp, config={
        **HUB_CONFIG_EXTRA,
        **hub_config,
        "JupyterHub.services": [{"name": "hubml", "url": f"http://{service_host}:{svc_port}", "api_token": svc_token}],
        "JupyterHub.load_roles": [
            {"name": "user", "scopes": ["self", *SCOPES]},
            {"name": "hubml-service", "services": ["hubml"], "scopes": ["read:users:groups", "read:users:name"]},
            *hub_config.get("JupyterHub.load_roles", []),
        ],
    }, users=list(users), groups={"ml-team": ["alice"]}, env=hub_env)
    proc, log_path = start_service(tmp, (svc_port, svc_token), hub, namespace, kubeconfig, mlflow_url,
                                   extra_config=extra_config, launcher=launcher, host=service_host)
    svc = HubService(hub=hub, url=hub.url + "services/hubml/", namespace=namespace, kube=kube, api=api, proc=proc,
                     log_path=log_path)
    if not wait_http(svc.url + "api/v1/openapi.json", timeout=60, alive=lambda: proc.poll() is None,
                     accept=lambda c: c == 200):
        text = log_path.read_text()[-3000:]
        await stop_stack(svc)
        raise RuntimeError(f"hubml service did not start (exit {proc.poll()}):\n{text}")
    svc.tokens = {u: hub.create_token(u, scopes=SCOPES) for u in users}
    if "alice" in users:
        svc.tokens["alice-noscope"] = hub.create_token("alice", scopes=["read:users:name!user=alice"])
    return svc


async def stop_stack(svc: HubService) -> None:
    from hubml.hub_ext import kube as k
    from hubml.hub_ext.rbac import service_rbac

    stop_process(svc.proc)
    svc.hub.stop()
    try:
        await svc.kube.request("DELETE", f"/api/v1/namespaces/{svc.namespace}")
        for obj in service_rbac(svc.namespace)[2:]:
            plural = "clusterroles" if obj["kind"] == "ClusterRole" else "clusterrolebindings"
            try:
                await svc.kube.request("DELETE",
                                       f"/apis/rbac.authorization.k8s.io/v1/{plural}/{obj['metadata']['name']}")
            except k.KubeError:
                pass
    finally:
        await svc.api.close()


@pytest.fixture(scope="module")
async def hub_service(kube_cluster, mlflow_server, tmp_path_factory):
    """JupyterHub + hubml service + control plane + MLflow, shared by a test module.

    Users: alice (group ml-team), bob, carol; ``tokens``: alice, bob, carol (all hubml
    scopes), ``alice-noscope`` (alice without hubml scopes).
    """
    async for svc in running_stack(kube_cluster, mlflow_server, tmp_path_factory.mktemp("hubsvc")):
        yield svc


async def wait_job_state(svc: HubService, job_id: str, state: str, user: str = "alice") -> dict:
    """Poll the service's job view (as the notebook does) until the job reads ``state``."""
    async def reached():
        status, body = await asyncio.to_thread(svc.call, "GET", f"/jobs/{job_id}", user=user)
        assert status == 200, body
        return body if body["state"] == state else None

    return await wait_for(reached, timeout=60, what=f"job {job_id} {state}")


async def running_stack(kube_cluster, mlflow_server, tmp: Path, **start: Any):
    """The body of a module-scoped stack fixture: start (a start failure fails
    the test with its reason), hand it over, stop it whatever happened."""
    try:
        svc = await start_stack(kube_cluster, mlflow_server.url, tmp, **start)
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield svc
    finally:
        await stop_stack(svc)


def assert_only_owner_sees(svc: HubService, job_id: str, other: str = "bob") -> None:
    """Another user's token gets 403 on every route of the job and no trace of it in their list."""
    for method, path in (("GET", f"/jobs/{job_id}"), ("POST", f"/jobs/{job_id}/cancel"),
                         ("GET", f"/jobs/{job_id}/logs")):
        status, body = svc.call(method, path, user=other)
        assert status == 403, (path, body)
    status, jobs = svc.call("GET", "/jobs", user=other)
    assert status == 200 and job_id not in {j["id"] for j in jobs}

