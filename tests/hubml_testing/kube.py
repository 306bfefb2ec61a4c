"""Pytest plugin: a real Kubernetes control plane with simulated GPU nodes.

Loaded by tests/conftest.py as ``hubml_testing.kube``. Mark tests that use it
with ``@pytest.mark.kube``.

Fixtures
--------
``kube_cluster`` (session)
    A :class:`hubml_testing.kube_cluster.KubeCluster`: etcd, kube-apiserver
    (authorization ``Node,RBAC``, ResourceQuota admission, service-account
    token signing), kube-controller-manager (garbage collector, job,
    resourcequota, namespace, serviceaccount(-token), node lifecycle ...),
    kube-scheduler and kwok, all on loopback, started once per test run.
    If ``HUBML_KUBECONFIG`` names the kubeconfig of a cluster already running
    (``export HUBML_KUBECONFIG=$(dev/kube-up)``) it is reused and left running.
    A missing binary or a failed start fails the tests with the reason; nothing
    is ever skipped. Attributes: ``server``, ``kubeconfig`` (admin, path),
    ``ca_file``, ``token``, ``crds``; methods ``api_client()`` (a new
    kubernetes_asyncio ``ApiClient``), ``configuration()``,
    ``without_crds(*names)`` (context manager: the named CRDs -
    "pytorchjob", "trainjob", "inferenceservice" - are deleted, with all their
    objects, and reinstalled on exit, for code that must detect their absence).

``kube_api`` (session)
    A kubernetes_asyncio ``ApiClient`` authenticated as cluster admin.

``kube_namespace`` (function)
    The name of a fresh namespace (its ``default`` ServiceAccount exists), deleted
    after the test.

Simulated nodes (dev/kube/topology.yaml)
----------------------------------------
``gpu-a100-0``, ``gpu-a100-1``: 8x NVIDIA-A100-SXM4-80GB, ``nvidia.com/gpu: 8``.
``gpu-a100-mig-0``: A100 MIG mixed, ``nvidia.com/mig-1g.10gb: 16``,
``mig-2g.20gb: 8``, ``mig-3g.40gb: 8``. ``gpu-h100-mig-0``: H100-80GB-HBM3 MIG
mixed, ``nvidia.com/mig-1g.20gb: 16``, ``mig-3g.40gb: 8``.
``gpu-t4-shared-0``: Tesla T4 time-sliced, 4 replicas, ``nvidia.com/gpu: 4``,
``nvidia.com/gpu.product=Tesla-T4-SHARED``. ``cpu-0``, ``cpu-1``: no GPU.
GPU nodes carry GPU Feature Discovery labels (``nvidia.com/gpu.product``,
``gpu.memory``, ``gpu.count``, ``mig.strategy``, ``gpu.sharing-strategy``,
``gpu.replicas`` ...) and the taint ``nvidia.com/gpu=present:NoSchedule``,
so a GPU pod needs the toleration, as on a GPU Operator cluster.

Pod outcome contract (kwok, dev/kube/kwok-stages.yaml)
------------------------------------------------------
No container runs: kwok plays the kubelet.

* A pod scheduled onto a simulated node becomes ``Running`` and Ready.
* Annotation ``kwok.hubml.io/outcome``, set at creation or patched later
  (``set_pod_outcome``), decides what happens next:
  ``succeed`` -> ``Succeeded`` (exit code 0, reason Completed);
  ``fail`` -> ``Failed`` with every container terminated with exit code
  ``kwok.hubml.io/exit-code`` (default 1), reason ``kwok.hubml.io/reason``
  (default Error) and message ``kwok.hubml.io/message``;
  ``run`` -> stays Running.
* Without the annotation a pod owned by a Job succeeds 1 s after Running;
  any other pod stays Running.
* ``kwok.hubml.io/delay`` (Go duration, "3s") delays the outcome.
* The outcome applies whatever the restartPolicy is (think of it as what the
  kubelet finally reports).
* A pod being deleted (deletionTimestamp set) is removed at once.

Put the annotations on a Job's pod template to steer its pods; use
``outcome_annotations()`` to build them with validation.

Container logs
--------------
kwok serves the kubelet API (containerLogs, with ``follow``) on one port of
every loopback address, which every simulated node advertises as its
``status.daemonEndpoints.kubeletEndpoint.Port``; so ``GET pods/<pod>/log``
(``kubectl logs [-f]``, ``read_namespaced_pod_log``) works through the API
server as on a real cluster. What a container "wrote" is a file the test
names: ``kube_cluster.serve_logs(namespace, pod, path, container=None)``
creates the kwok ``Logs`` object (and returns once kwok serves it);
``append_container_log(path, lines, stream="stdout", partial=False)`` (from
``hubml_testing.kube_cluster``) appends CRI-format records, also while the
pod runs. A pod without such a file answers 400 "no logs found".

Deleting a batch/v1 Job through the API orphans its pods unless the request
says ``propagation_policy="Background"`` (or Foreground), as on any cluster.

Other helpers: ``wait_for``, ``set_pod_outcome``, ``pod_events``,
``service_account_kubeconfig`` (least-privilege kubeconfig for a
ServiceAccount via the TokenRequest API), ``scale_up`` (1,000 nodes / 20,000
pods for benchmarks, from kube_cluster).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from hubml_testing.kube_binaries import KubeHarnessError
from hubml_testing.kube_cluster import KubeCluster, scale_up
from hubml_testing.kube_control_plane import start_cluster
from hubml_testing.kube_crds import CRDS
from hubml_testing.kube_manifests import kubeconfig_dict, outcome_annotations

__all__ = [
    "CRDS",
    "KubeCluster",
    "KubeHarnessError",
    "outcome_annotations",
    "pod_events",
    "scale_up",
    "service_account_kubeconfig",
    "set_pod_outcome",
    "wait_for",
]

T = TypeVar("T")


@pytest.fixture(scope="session")
def kube_cluster(pytestconfig: pytest.Config) -> Iterator[KubeCluster]:
    """The session's control plane (started here, or reused from HUBML_KUBECONFIG)."""
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    reuse = os.environ.get("HUBML_KUBECONFIG")
    try:
        if reuse:
            cluster = KubeCluster.from_kubeconfig(Path(reuse))
            if not cluster.is_healthy():
                raise KubeHarnessError(
                    f"HUBML_KUBECONFIG={reuse} points at {cluster.server}, which does not answer /readyz; "
                    "start it with `dev/kube-up` or unset HUBML_KUBECONFIG."
                )
        else:
            t0 = time.monotonic()
            cluster = start_cluster()
            msg = f"hubml kube control plane started in {time.monotonic() - t0:.1f} s ({cluster.server})"
            capman = pytestconfig.pluginmanager.get_plugin("capturemanager")
            if reporter is not None and capman is not None:  # shown even with output capture on
                with capman.global_and_fixture_disabled():
                    reporter.write_line(f"\n{msg}")
            else:
                print(msg)
    except KubeHarnessError as exc:
        pytest.fail(f"test Kubernetes control plane unavailable: {exc}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
async def kube_api(kube_cluster: KubeCluster) -> AsyncIterator[Any]:
    """kubernetes_asyncio ApiClient with cluster-admin rights."""
    async with kube_cluster.api_client() as api:
        yield api


@pytest.fixture
async def kube_namespace(kube_api: Any, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A fresh namespace for one test, deleted afterwards."""
    from kubernetes_asyncio import client

    core = client.CoreV1Api(kube_api)
    stem = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-") or "t"
    name = f"t-{stem}-{secrets.token_hex(3)}"
    await core.create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels={"hubml.io/test": "true"}))
    )

    async def default_sa() -> bool:
        sas = await core.list_namespaced_service_account(name, field_selector="metadata.name=default")
        return bool(sas.items)

    await wait_for(default_sa, what=f"ServiceAccount default in {name}")
    try:
        yield name
    finally:
        await core.delete_namespace(name, propagation_policy="Background")


async def wait_for(
    check: Callable[[], Awaitable[T] | T], timeout: float = 60.0, interval: float = 0.1, what: str = "condition"
) -> T:
    """Poll `check` until it returns something truthy, and return that.

    Raises AssertionError naming `what` after `timeout` seconds; the timeout
    is a safety net against hangs, not a speed assertion.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = check()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last value: {last!r})")
        await asyncio.sleep(interval)


async def set_pod_outcome(api: Any, namespace: str, pod: str, outcome: str, **kw: Any) -> None:
    """Patch the kwok outcome annotations onto a pod (see the contract above)."""
    from kubernetes_asyncio import client

    ann = outcome_annotations(outcome, **kw)
    await client.CoreV1Api(api).patch_namespaced_pod(pod, namespace, {"metadata": {"annotations": ann}})


async def pod_events(api: Any, namespace: str, pod: str) -> list[Any]:
    """Events whose involvedObject is the pod (e.g. FailedScheduling)."""
    from kubernetes_asyncio import client

    events = await client.CoreV1Api(api).list_namespaced_event(
        namespace, field_selector=f"involvedObject.kind=Pod,involvedObject.name={pod}"
    )
    return list(events.items)


async def service_account_kubeconfig(
    cluster: KubeCluster,
    api: Any,
    namespace: str,
    service_account: str,
    path: Path,
    expiration_seconds: int = 3600,
) -> Path:
    """Write a kubeconfig that authenticates as `namespace`/`service_account`.

    The token comes from the TokenRequest API (as a pod's projected token
    would), so RBAC tests see exactly the rights granted to that
    ServiceAccount and nothing more.
    """
    from kubernetes_asyncio import client

    if expiration_seconds < 600:
        raise ValueError(f"the API server requires expiration_seconds >= 600, got {expiration_seconds}")
    tr = await client.CoreV1Api(api).create_namespaced_service_account_token(
        service_account,
        namespace,
        client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=expiration_seconds)),
    )
    cfg = kubeconfig_dict(
        cluster.server,
        cluster.ca_file.read_bytes(),
        tr.status.token,
        f"system:serviceaccount:{namespace}:{service_account}",
        namespace,
    )
    path = Path(path)
    path.write_text(yaml.safe_dump(cfg))
    path.chmod(0o600)
    return path
