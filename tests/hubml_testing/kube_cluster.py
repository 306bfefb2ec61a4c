"""A real Kubernetes control plane with kwok-simulated GPU nodes, for tests,
dev and benchmarks.

Why this exists: everything in hubml that talks to Kubernetes is tested
against a real API server (schema validation, admission, ResourceQuota,
scheduling, controllers, garbage collection), never a mock. This module runs
etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok on
loopback from the binaries `dev/kube/build.sh` caches in
``~/.cache/hubml/kube-<version>/bin/``, creates the nodes of
``dev/kube/topology.yaml`` and installs the CRDs of ``dev/kube/crds/`` and KServe's
(and kwok's Logs/ClusterLogs CRDs of ``dev/kube/kwok-crds/``: kwok serves
container logs from files named in those objects, see ``serve_logs``).

Used three ways:

* the pytest plugin ``hubml_testing.kube`` (session fixture ``kube_cluster``);
* the command line ``hubml_testing.kube_cli``, wrapped by ``dev/kube-up`` / ``dev/kube-down``;
* benchmarks: ``kube_control_plane.start_cluster()`` / ``KubeCluster.stop()`` and ``scale_up()``.

This module holds the cluster object tests use (``KubeCluster``: access,
lifecycle, container logs, CRDs) and scale mode. The rest lives in modules
named for what they hold: ``kube_binaries`` (versions, binaries, the harness
error), ``kube_manifests`` (pure node/pod/kubeconfig/outcome manifests),
``kwok`` (kwok's configuration and container-log files), ``kube_pki``,
``kube_rest`` (a small synchronous REST client, so set-up runs outside any
event loop), ``kube_crds``, ``kube_processes`` and ``kube_control_plane``
(starting the processes). Tests get ``kubernetes_asyncio`` clients from
``KubeCluster.api_client()``.
"""


from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import re
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hubml_testing.kube_binaries import KubeHarnessError
from hubml_testing.kube_crds import KSERVE_CRDS, check_crd_names, install_crds, uninstall_crds, wait_gone
from hubml_testing.kube_manifests import SCALE_LABEL, kubeconfig_dict, load_topology, scale_nodes, scale_pods
from hubml_testing.kube_processes import stop_processes
from hubml_testing.kube_rest import Rest
from hubml_testing.kwok import KWOK_API, logs_manifest

STATE_FILE = "state.json"


@dataclass
class KubeCluster:
    """A running control plane: where it listens, how to authenticate, what runs it."""

    state_dir: Path
    server: str
    token: str
    ca_file: Path
    kubeconfig: Path
    pids: dict[str, int] = field(default_factory=dict)
    binaries: dict[str, str] = field(default_factory=dict)
    crds: list[str] = field(default_factory=list)
    kwok_port: int | None = None  # kwok's kubelet-like server (every node's kubeletEndpoint port)
    owned: bool = True  # False when reusing a cluster someone else started (HUBML_KUBECONFIG)
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False)

    # ---- access -------------------------------------------------------
    @property
    def rest(self) -> Rest:
        return Rest(self.server, self.token, self.ca_file)

    def configuration(self) -> Any:
        """A kubernetes_asyncio Configuration for the admin user of this cluster."""
        from kubernetes_asyncio import client

        cfg = client.Configuration()
        cfg.host = self.server
        cfg.api_key = {"BearerToken": self.token}
        cfg.api_key_prefix = {"BearerToken": "Bearer"}
        cfg.ssl_ca_cert = str(self.ca_file)
        cfg.verify_ssl = True
        return cfg

    def api_client(self) -> Any:
        """A new kubernetes_asyncio ApiClient (use as `async with cluster.api_client() as api:`)."""
        from kubernetes_asyncio import client

        return client.ApiClient(configuration=self.configuration())

    def kubeconfig_text(self, namespace: str | None = None) -> str:
        return yaml.safe_dump(kubeconfig_dict(self.server, self.ca_file.read_bytes(), self.token, "admin", namespace))

    # ---- lifecycle ----------------------------------------------------
    def save(self) -> None:
        state = {
            "server": self.server,
            "token": self.token,
            "ca_file": str(self.ca_file),
            "kubeconfig": str(self.kubeconfig),
            "pids": self.pids,
            "binaries": self.binaries,
            "crds": self.crds,
            "kwok_port": self.kwok_port,
        }
        tmp = self.state_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_dir / STATE_FILE)

    @classmethod
    def load(cls, state_dir: Path) -> KubeCluster:
        try:
            state = json.loads((state_dir / STATE_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise KubeHarnessError(f"no control plane state in {state_dir}: {exc}") from exc
        return cls(
            state_dir=state_dir,
            server=state["server"],
            token=state["token"],
            ca_file=Path(state["ca_file"]),
            kubeconfig=Path(state["kubeconfig"]),
            pids={k: int(v) for k, v in state["pids"].items()},
            binaries=state.get("binaries", {}),
            crds=list(state.get("crds", [])),
            kwok_port=state.get("kwok_port"),
        )

    @classmethod
    def from_kubeconfig(cls, path: Path) -> KubeCluster:
        """Attach to a cluster started elsewhere (e.g. by dev/kube-up) through its kubeconfig."""
        try:
            cfg = yaml.safe_load(Path(path).read_text())
            ctx_name = cfg["current-context"]
            ctx = next(c["context"] for c in cfg["contexts"] if c["name"] == ctx_name)
            clus = next(c["cluster"] for c in cfg["clusters"] if c["name"] == ctx["cluster"])
            user = next(u["user"] for u in cfg["users"] if u["name"] == ctx["user"])
            token = user["token"]
            ca_pem = base64.b64decode(clus["certificate-authority-data"])
        except (OSError, KeyError, StopIteration, TypeError, ValueError, yaml.YAMLError) as exc:
            raise KubeHarnessError(
                f"cannot use kubeconfig {path}: {exc!r}. It must be one written by "
                "`dev/kube-up` (token user, certificate-authority-data); unset HUBML_KUBECONFIG "
                "to let the tests start their own control plane."
            ) from exc
        state_dir = Path(path).resolve().parent
        ca_file = state_dir / "pki" / "ca.crt"
        if not ca_file.is_file() or ca_file.read_bytes() != ca_pem:
            ca_file = Path(tempfile.mkdtemp(prefix="hubml-kube-ca-")) / "ca.crt"
            ca_file.write_bytes(ca_pem)
        crds: list[str] = []
        kwok_port = None
        with contextlib.suppress(KubeHarnessError, OSError):
            saved = KubeCluster.load(state_dir)
            crds, kwok_port = saved.crds, saved.kwok_port
        return cls(
            state_dir=state_dir,
            server=clus["server"],
            token=token,
            ca_file=ca_file,
            kubeconfig=Path(path),
            crds=crds,
            kwok_port=kwok_port,
            owned=False,
        )

    def is_healthy(self) -> bool:
        try:
            status, _ = self.rest.request("GET", "/readyz")
        except (OSError, http.client.HTTPException, ssl.SSLError):
            return False
        return status == 200

    def stop(self, timeout: float = 15.0) -> None:
        """Stop every process of this cluster (kwok first, etcd last) and remove its state."""
        if not self.owned:
            return
        stop_processes(self.pids, self.binaries, self._procs, timeout)
        self.pids.clear()
        shutil.rmtree(self.state_dir, ignore_errors=True)

    # ---- container logs (kwok Logs objects) ----------------------------
    def serve_logs(self, namespace: str, pod: str, path: Path | str, *, container: str | None = None,
                   timeout: float = 30.0) -> Path:
        """Make `path` the log of `container` (every container when None) of pod `namespace/pod`.

        Why: no container runs on a simulated node, so nothing writes logs; kwok
        reads them from a file named in a ``Logs`` object (kwok.x-k8s.io) and
        serves them on its kubelet API, which is where the API server proxies
        ``GET pods/<pod>/log`` (``kubectl logs``, with ``follow`` too). The file
        must hold CRI-format records: write it with ``append_container_log``;
        it is created empty when missing, and may be appended to while pods run.
        The pod need not exist yet (kwok matches the object by namespace and
        name). Returns once kwok serves the file (``KubeHarnessError`` after
        `timeout` s); a second call for another container of the same pod adds
        to the same object. The object goes away with its namespace.
        """
        path = Path(path).resolve()
        if path.is_dir():
            raise ValueError(f"{path} is a directory; serve_logs needs a log file (CRI format)")
        if container is not None and not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", container):
            raise ValueError(f"container must be a container name (DNS label), got {container!r}")
        entry: dict[str, Any] = {"logsFile": str(path), "follow": True}
        if container is not None:
            entry["containers"] = [container]
        obj = logs_manifest(namespace, pod, [entry])  # checks the names before anything exists
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        rest = self.rest
        url = f"{KWOK_API}/namespaces/{namespace}/logs"
        status, existing = rest.request("GET", f"{url}/{pod}")
        if status == 200:
            keep = [e for e in existing["spec"].get("logs") or [] if e.get("containers") != entry.get("containers")]
            obj["spec"]["logs"] = [entry, *keep]
            obj["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
            rest.must("PUT", f"{url}/{pod}", obj)
        else:
            rest.must("POST", url, obj)
        self._wait_kwok_serves(namespace, pod, container or "any", path, timeout)
        return path

    def _wait_kwok_serves(self, namespace: str, pod: str, container: str, path: Path, timeout: float) -> None:
        """Poll kwok's own server until its watch of Logs objects has caught up (it answers 200)."""
        if self.kwok_port is None:  # attached to a cluster that did not record its kwok port
            return
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            conn = http.client.HTTPSConnection("127.0.0.1", self.kwok_port, timeout=5, context=ctx)
            try:
                conn.request("GET", f"/containerLogs/{namespace}/{pod}/{container}?limitBytes=1")
                resp = conn.getresponse()
                last = f"{resp.status} {resp.read()[:300].decode(errors='replace')}"
                if resp.status == 200:
                    return
            except (OSError, http.client.HTTPException) as exc:
                last = repr(exc)
            finally:
                conn.close()
            if time.monotonic() > deadline:
                raise KubeHarnessError(
                    f"kwok did not serve {path} as the log of {namespace}/{pod} within {timeout:.0f} s "
                    f"(last answer: {last}); see kwok.log in {self.state_dir / 'logs'}"
                )
            time.sleep(0.05)

    # ---- CRDs ---------------------------------------------------------
    def install_crds(self, names: Iterable[str], kserve_release: str = "current") -> None:
        install_crds(self.rest, names, kserve_release=kserve_release)
        for n in names:
            if n not in self.crds:
                self.crds.append(n)

    def uninstall_crds(self, names: Iterable[str]) -> None:
        uninstall_crds(self.rest, names)
        self.crds = [c for c in self.crds if c not in set(names)]

    @contextlib.contextmanager
    def without_crds(self, *names: str) -> Iterator[None]:
        """Temporarily remove CRDs (and every object of their kinds) so code can be
        tested on a cluster without Kubeflow/KServe; they are reinstalled after."""
        check_crd_names(names)
        self.uninstall_crds(names)
        try:
            yield
        finally:
            self.install_crds(names)

    @contextlib.contextmanager
    def kserve_release(self, release: str = "previous") -> Iterator[None]:
        """Serve the KServe CRDs of another pinned release ("previous": no Standard-mode
        ``spec.canary``) for the block, then the current ones again; objects are kept."""
        before = self._published_isvc_schema()
        self.install_crds(KSERVE_CRDS, kserve_release=release)
        swapped = self._wait_published_isvc_schema_changes(before)
        try:
            yield
        finally:
            self.install_crds(KSERVE_CRDS)
            self._wait_published_isvc_schema_changes(swapped)

    def _published_isvc_schema(self) -> str:
        """The URL (with content hash) of serving.kserve.io/v1beta1's published OpenAPI v3 document."""
        status, root = self.rest.request("GET", "/openapi/v3")
        if status != 200:
            raise KubeHarnessError(f"GET /openapi/v3 answered {status}: {root}")
        return str(((root.get("paths") or {}).get("apis/serving.kserve.io/v1beta1") or {}).get(
            "serverRelativeURL") or "")

    def _wait_published_isvc_schema_changes(self, before: str, timeout: float = 60.0) -> str:
        # Established is not published: the API server's OpenAPI controller republishes a changed CRD's
        # schema a little later, and what clients discover (hub_ext's canary detection) is that document.
        deadline = time.monotonic() + timeout
        while True:
            now = self._published_isvc_schema()
            if now and now != before:
                return now
            if time.monotonic() > deadline:
                raise KubeHarnessError(f"the API server did not republish serving.kserve.io/v1beta1's OpenAPI "
                                       f"document within {timeout:.0f} s of the KServe CRD swap (still {now!r})")
            time.sleep(0.1)


def default_state_dir() -> Path:
    """State of the cluster started by `up`: $HUBML_KUBE_RUN_DIR or <tmp>/hubml-kube-<uid>."""
    env = os.environ.get("HUBML_KUBE_RUN_DIR")
    return Path(env) if env else Path(tempfile.gettempdir()) / f"hubml-kube-{os.getuid()}"


# --------------------------------------------------------------------------
# scale mode (benchmarks)
# --------------------------------------------------------------------------


def scale_up(
    cluster: KubeCluster,
    nodes: int = 1000,
    pods: int = 20000,
    namespace: str | None = None,
    workers: int = 16,
    log: Any = None,
) -> dict[str, float]:
    """Add `nodes` simulated nodes and `pods` pods bound to them (spec.nodeName).

    For benchmarks that need a cluster the size of a real ML platform. Returns
    timings {"nodes_s", "pods_s", "nodes", "pods"}. Objects that already exist
    are left as they are, so calling it twice is safe.
    """
    say = log or (lambda msg: None)
    topo = load_topology()
    namespace = namespace or topo["scale"]["namespace"]
    rest = cluster.rest
    node_objs = scale_nodes(topo, nodes)

    def create(path: str, obj: dict[str, Any]) -> None:
        status, payload = rest.request("POST", path, obj)
        if status not in (200, 201, 409):
            raise KubeHarnessError(f"POST {path} {obj['metadata']['name']}: {status} {payload}")

    t0 = time.monotonic()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda n: create("/api/v1/nodes", n), node_objs))
    t_nodes = time.monotonic() - t0
    say(f"{nodes} nodes created in {t_nodes:.1f} s")
    create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    deadline = time.monotonic() + 60
    while rest.request("GET", f"/api/v1/namespaces/{namespace}/serviceaccounts/default")[0] != 200:
        if time.monotonic() > deadline:
            raise KubeHarnessError(f"no default ServiceAccount in {namespace} after 60 s")
        time.sleep(0.1)
    pod_objs = scale_pods([n["metadata"]["name"] for n in node_objs], pods, namespace)
    t1 = time.monotonic()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda p: create(f"/api/v1/namespaces/{namespace}/pods", p), pod_objs))
    t_pods = time.monotonic() - t1
    say(f"{pods} pods created in {t_pods:.1f} s")
    return {"nodes_s": t_nodes, "pods_s": t_pods, "nodes": float(nodes), "pods": float(pods)}


def scale_down(cluster: KubeCluster, namespace: str | None = None, timeout: float = 120.0) -> None:
    """Remove what scale_up added: its namespace (and pods) and every scale node."""
    topo = load_topology()
    namespace = namespace or topo["scale"]["namespace"]
    rest = cluster.rest
    # Pods first, while kwok still manages their nodes and removes them at
    # once; pods left on deleted nodes would wait for the pod GC instead.
    rest.must("DELETE", f"/api/v1/namespaces/{namespace}", ok=(200, 202, 404))
    wait_gone(rest, f"/api/v1/namespaces/{namespace}", timeout)
    selector = urllib.parse.quote(f"{SCALE_LABEL}=true")
    rest.must("DELETE", f"/api/v1/nodes?labelSelector={selector}", ok=(200,))
