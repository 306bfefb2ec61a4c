"""Starting the test control plane: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and kwok on loopback, then the topology nodes and the CRDs, each step
waited for with the failing process and its log tail named on error."""

from __future__ import annotations

import http.client
import json
import os
import secrets
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from hubml_testing.kube_binaries import KUBE_DEV_DIR, KubeHarnessError, find_binaries
from hubml_testing.kube_cluster import KubeCluster
from hubml_testing.kube_crds import CRDS, check_crd_names, install_crds, install_kwok_crds
from hubml_testing.kube_manifests import KWOK_NODE_ANNOTATION, TOPOLOGY_FILE, kubeconfig_dict, load_topology, topology_nodes
from hubml_testing.kube_pki import SERVICE_CIDR, make_pki
from hubml_testing.kube_processes import log_tail, pid_alive, stop_processes
from hubml_testing.ports import free_port
from hubml_testing.kube_rest import Rest
from hubml_testing.kwok import kwok_configuration

STAGES_FILE = KUBE_DEV_DIR / "kwok-stages.yaml"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"


def start_cluster(
    state_dir: Path | None = None,
    crds: Iterable[str] = tuple(CRDS),
    topology: Path | None = TOPOLOGY_FILE,
    detach: bool = False,
    timeout: float = 90.0,
    log: Any = None,
) -> KubeCluster:
    """Start etcd, kube-apiserver, controller-manager, scheduler and kwok on
    loopback, create the topology's nodes and install `crds`.

    `state_dir` (default: a new temp dir) holds PKI, etcd data, logs and
    state.json; it must not hold a running cluster. `detach=True` lets the
    processes outlive this Python process (the `up` command). On any failure
    everything started so far is stopped and the error names the process and
    the tail of its log.
    """
    crds = list(crds)
    check_crd_names(crds)
    binaries = find_binaries()
    say = log or (lambda msg: None)
    t0 = time.monotonic()
    if state_dir is None:
        state_dir = Path(tempfile.mkdtemp(prefix="hubml-kube-"))
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    pki, logs = state_dir / "pki", state_dir / "logs"
    logs.mkdir(exist_ok=True)
    make_pki(pki)

    tokens = {name: secrets.token_hex(24) for name in ("admin", "controller-manager", "scheduler", "kwok")}
    (pki / "tokens.csv").write_text(
        f'{tokens["admin"]},hubml-admin,uid-admin,"system:masters"\n'
        # The controller-manager runs every controller under its own identity
        # (--use-service-account-credentials=false): minting ~40 controller
        # ServiceAccount tokens at start-up costs seconds on 2 cores, and tests
        # exercise RBAC of user workloads, not of the built-in controllers.
        f'{tokens["controller-manager"]},system:kube-controller-manager,uid-kcm,"system:masters"\n'
        f"{tokens['scheduler']},system:kube-scheduler,uid-sched\n"
        f'{tokens["kwok"]},kwok-controller,uid-kwok,"system:masters"\n'
    )
    os.chmod(pki / "tokens.csv", 0o600)
    ports = {n: free_port() for n in ("etcd", "etcd-peer", "apiserver", "kcm", "sched")}
    ports["kwok"] = free_port("0.0.0.0")  # kwok listens on every address (see kwok_configuration)
    server = f"https://127.0.0.1:{ports['apiserver']}"
    ca_pem = (pki / "ca.crt").read_bytes()
    kubeconfigs = {}
    for name, user in (("admin", "admin"), ("controller-manager", "system:kube-controller-manager"),
                       ("scheduler", "system:kube-scheduler"), ("kwok", "kwok-controller")):
        path = state_dir / ("kubeconfig" if name == "admin" else f"{name}.kubeconfig")
        path.write_text(yaml.safe_dump(kubeconfig_dict(server, ca_pem, tokens[name], user)))
        os.chmod(path, 0o600)
        kubeconfigs[name] = path

    cluster = KubeCluster(
        state_dir=state_dir,
        server=server,
        token=tokens["admin"],
        ca_file=pki / "ca.crt",
        kubeconfig=kubeconfigs["admin"],
        binaries={k: str(v) for k, v in binaries.items()},
        kwok_port=ports["kwok"],
    )
    kwok_config = state_dir / "kwok.yaml"
    kwok_config.write_text(yaml.safe_dump(kwok_configuration(ports["kwok"], pki / "kwok.crt", pki / "kwok.key")))

    def spawn(name: str, argv: list[str]) -> None:
        logf = open(logs / f"{name}.log", "ab")
        try:
            proc = subprocess.Popen(
                [str(binaries[name]), *argv],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=state_dir,
                # `up` detaches them from the terminal; under pytest they stay in
                # its process group so a Ctrl-C reaches them too.
                start_new_session=detach,
            )
        finally:
            logf.close()
        cluster.pids[name] = proc.pid
        if not detach:
            cluster._procs[name] = proc
        cluster.save()

    def check_alive() -> None:
        for name, pid in cluster.pids.items():
            proc = cluster._procs.get(name)
            dead = proc.poll() is not None if proc is not None else not pid_alive(pid)
            if dead:
                raise KubeHarnessError(
                    f"{name} exited during start-up; last lines of {logs / (name + '.log')}:\n"
                    + log_tail(logs / f"{name}.log")
                )

    def wait(what: str, probe: Any, until: float) -> None:
        while True:
            check_alive()
            try:
                if probe():
                    return
            except (OSError, http.client.HTTPException, ssl.SSLError, KeyError, TypeError):
                pass
            if time.monotonic() > until:
                names = ", ".join(f"{logs / n}.log" for n in cluster.pids)
                raise KubeHarnessError(f"timed out after {timeout:.0f} s waiting for {what}; see {names}")
            time.sleep(0.1)

    deadline = t0 + timeout
    try:
        spawn("etcd", [
            "--name=default",
            f"--data-dir={state_dir / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{ports['etcd']}",
            f"--advertise-client-urls=http://127.0.0.1:{ports['etcd']}",
            f"--listen-peer-urls=http://127.0.0.1:{ports['etcd-peer']}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{ports['etcd-peer']}",
            f"--initial-cluster=default=http://127.0.0.1:{ports['etcd-peer']}",
            "--unsafe-no-fsync=true",
            "--quota-backend-bytes=8589934592",
            "--log-level=warn",
        ])
        etcd_url = f"http://127.0.0.1:{ports['etcd']}"

        def etcd_ok() -> bool:
            conn = http.client.HTTPConnection("127.0.0.1", ports["etcd"], timeout=2)
            try:
                conn.request("GET", "/health")
                return json.loads(conn.getresponse().read()).get("health") == "true"
            finally:
                conn.close()

        wait("etcd /health", etcd_ok, deadline)
        say(f"etcd ready after {time.monotonic() - t0:.1f} s")

        spawn("kube-apiserver", [
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={ports['apiserver']}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--token-auth-file={pki / 'tokens.csv'}",
            "--authorization-mode=Node,RBAC",
            "--kubelet-preferred-address-types=InternalIP",
            "--enable-admission-plugins=NodeRestriction,ResourceQuota,LimitRanger,ServiceAccount,DefaultTolerationSeconds",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--endpoint-reconciler-type=none",
            "--allow-privileged=true",
            "--profiling=false",
            f"--cert-dir={pki}",
        ])
        wait("kube-apiserver /readyz", cluster.is_healthy, deadline)
        say(f"kube-apiserver ready after {time.monotonic() - t0:.1f} s")
        # kwok watches its Logs/ClusterLogs objects from the start: their CRDs come first
        kwok_crd_errors: list[BaseException] = []

        def kwok_crd_job() -> None:
            try:
                install_kwok_crds(cluster.rest, timeout=max(5.0, deadline - time.monotonic()))
            except BaseException as exc:  # re-raised in the main thread below
                kwok_crd_errors.append(exc)

        kwok_crd_thread = threading.Thread(target=kwok_crd_job, name="hubml-kube-kwok-crds", daemon=True)
        kwok_crd_thread.start()

        spawn("kube-controller-manager", [
            f"--kubeconfig={kubeconfigs['controller-manager']}",
            f"--authentication-kubeconfig={kubeconfigs['controller-manager']}",
            f"--authorization-kubeconfig={kubeconfigs['controller-manager']}",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports['kcm']}",
            "--leader-elect=false",
            "--use-service-account-credentials=false",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--controllers=*",
            # client-side rate limits as kwokctl sets them: tests and the scale
            # mode should not queue behind the 20 QPS meant for big clusters
            "--kube-api-qps=500",
            "--kube-api-burst=1000",
            "--node-monitor-period=2s",
            f"--cert-dir={state_dir / 'kcm-certs'}",
        ])
        spawn("kube-scheduler", [
            f"--kubeconfig={kubeconfigs['scheduler']}",
            f"--authentication-kubeconfig={kubeconfigs['scheduler']}",
            f"--authorization-kubeconfig={kubeconfigs['scheduler']}",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports['sched']}",
            "--leader-elect=false",
            "--kube-api-qps=500",
            "--kube-api-burst=1000",
            f"--cert-dir={state_dir / 'sched-certs'}",
        ])
        kwok_crd_thread.join(max(1.0, deadline - time.monotonic()))
        if kwok_crd_thread.is_alive():
            raise KubeHarnessError(f"kwok's CRDs not established within {timeout:.0f} s")
        if kwok_crd_errors:
            raise kwok_crd_errors[0]
        say(f"kwok CRDs established after {time.monotonic() - t0:.1f} s")
        spawn("kwok", [
            f"--kubeconfig={kubeconfigs['kwok']}",
            f"--config={STAGES_FILE}",
            f"--config={kwok_config}",
            f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION[0]}={KWOK_NODE_ANNOTATION[1]}",
            "--node-lease-duration-seconds=40",
            "--cidr=10.244.0.1/16",
            "--node-ip=127.0.1.1",
        ])

        rest = cluster.rest
        if topology is not None:
            topo = load_topology(topology)
            nodes = topology_nodes(topo)
            for node in nodes:
                status, payload = rest.request("POST", "/api/v1/nodes", node)
                if status not in (200, 201):
                    raise KubeHarnessError(f"creating node {node['metadata']['name']}: {status} {payload}")
        # CRDs are installed while the controllers and kwok come up (independent waits).
        crd_errors: list[BaseException] = []

        def crd_job() -> None:
            try:
                install_crds(rest, crds, timeout=max(5.0, deadline - time.monotonic()))
                say(f"CRDs {', '.join(crds)} established after {time.monotonic() - t0:.1f} s")
            except BaseException as exc:  # re-raised in the main thread below
                crd_errors.append(exc)

        crd_thread = threading.Thread(target=crd_job, name="hubml-kube-crds", daemon=True)
        if crds:
            crd_thread.start()

        def components_ok() -> bool:
            ok = True
            for port in (ports["kcm"], ports["sched"]):
                conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=2, context=ssl._create_unverified_context())
                try:
                    conn.request("GET", "/healthz")
                    ok = ok and conn.getresponse().status == 200
                finally:
                    conn.close()
            return ok

        wait("kube-controller-manager and kube-scheduler /healthz", components_ok, deadline)
        say(f"controller-manager and scheduler healthy after {time.monotonic() - t0:.1f} s")

        def default_sa() -> bool:
            return rest.request("GET", "/api/v1/namespaces/default/serviceaccounts/default")[0] == 200

        wait("the default ServiceAccount (controller-manager)", default_sa, deadline)
        say(f"default ServiceAccount after {time.monotonic() - t0:.1f} s")
        if topology is not None:
            want = {n["metadata"]["name"] for n in nodes}
            wait("simulated nodes Ready and untainted (kwok + node lifecycle controller)",
                 lambda: _nodes_schedulable(rest, want), deadline)
        say(f"nodes ready after {time.monotonic() - t0:.1f} s")
        kwok_ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))

        def kwok_server_ok() -> bool:
            conn = http.client.HTTPSConnection("127.0.0.1", ports["kwok"], timeout=2, context=kwok_ctx)
            try:
                conn.request("GET", "/healthz")
                return conn.getresponse().status == 200
            finally:
                conn.close()

        wait("kwok's server /healthz (HTTPS, cluster CA)", kwok_server_ok, deadline)
        if crds:
            crd_thread.join(max(1.0, deadline - time.monotonic()))
            if crd_thread.is_alive():
                raise KubeHarnessError(f"CRDs not established within {timeout:.0f} s")
            if crd_errors:
                raise crd_errors[0]
            cluster.crds = list(crds)
        cluster.save()
        return cluster
    except BaseException:
        stop_processes(cluster.pids, cluster.binaries, cluster._procs, 10.0)
        cluster.pids.clear()
        cluster.save()
        raise


def _nodes_schedulable(rest: Rest, names: set[str]) -> bool:
    """True when every named node is Ready and has lost the not-ready taint."""
    status, payload = rest.request("GET", "/api/v1/nodes?labelSelector=type%3Dkwok")
    if status != 200:
        return False
    ready = set()
    for node in payload["items"]:
        conds = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
        taints = {t["key"] for t in node.get("spec", {}).get("taints") or []}
        if conds.get("Ready") == "True" and "node.kubernetes.io/not-ready" not in taints:
            ready.add(node["metadata"]["name"])
    return names <= ready
