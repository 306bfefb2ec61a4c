"""A real node beside the kwok ones: containerd + runc, Debian's CNI plugins on a bridge,
kubelet, kube-proxy and CoreDNS, all host processes of this machine, joined to the test
control plane so that pods really run (issue 11).

Why here and not kwok: kwok never starts a container, so nothing proved that a pod
of hubml's images starts, resolves its peers or reaches MLflow. kwok nodes stay for
scale and GPU topology; this node carries the taint ``hubml.io/real-node=true:NoSchedule``
so that only pods which tolerate it land here and every other test keeps kwok's contract.

Network safety comes first (``network_guard``, before any process starts):

* blackhole routes on the host for the pod ranges (the real node's and kwok's) and the
  Service range, so a host packet for any such address is dropped, never sent to the
  default gateway;
* the bridge ``hubml0`` (10.245.0.1/24) is made by the harness, and every packet that
  enters the host from it is routed by a table of its own (``ip rule iif hubml0``)
  that holds the bridge subnet and a blackhole default: a pod can reach other pods,
  the host's own addresses and Services (DNAT happens before routing), nothing else;
* the bridge has a MAC address of its own (``BRIDGE_MAC``): a Linux bridge without one
  takes the lowest MAC among its ports, so it changed whenever a pod's veth came or went
  and pods kept sending to the gateway's old MAC (their ARP cache) until it went stale:
  seconds in which a pod could not reach DNS, MLflow or the hub;
* no masquerade anywhere (the CNI bridge has ``ipMasq: false``), CoreDNS has no
  ``forward``: a name outside cluster.local is not resolved.

containerd keeps its content store under ~/.cache/hubml/node/containerd so hubml's
GiB-sized images are imported once per content key, not once per run.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hubml_testing.kube_binaries import KubeHarnessError, cache_root, find_binaries
from hubml_testing.kube_cluster import KubeCluster
from hubml_testing.kube_manifests import kubeconfig_dict
from hubml_testing.kube_pki import SERVICE_CIDR
from hubml_testing.kube_processes import log_tail, stop_processes
from hubml_testing.ports import free_port
from hubml_testing.node_images import PAUSE_IMAGE, NodeImage, busybox_image, pause_image

NODE_NAME = "hubml-node-0"
BRIDGE = "hubml0"
POD_SUBNET = "10.245.0.0/24"  # this node's pods
GATEWAY_IP = "10.245.0.1"  # the host on the bridge: node IP, cluster DNS, reachable host services
BRIDGE_MAC = "02:42:0a:f5:00:01"  # locally administered; fixed so pods' ARP entries for the gateway stay right
#: ranges no host packet may leave the machine for: this node's, kwok's and the Services'
BLACKHOLES = ("10.245.0.0/16", "10.244.0.0/16", SERVICE_CIDR)
ROUTE_TABLE = 245  # the bridge's own routing table (subnet + blackhole default)
RULE_PRIORITY = 245
REAL_NODE_TAINT = {"key": "hubml.io/real-node", "value": "true", "effect": "NoSchedule"}
REAL_NODE_TOLERATION = {"key": "hubml.io/real-node", "operator": "Equal", "value": "true", "effect": "NoSchedule"}
REAL_NODE_LABELS = {"hubml.io/node": "real", "nvidia.com/gpu.product": "hubml-CPU-as-GPU"}
#: what a device plugin would report: profiles that ask for a GPU can be placed here (they run on CPU)
ADVERTISED_GPUS = 2
NODE_BINARIES = ("kubelet", "kube-proxy", "coredns")
HOST_COMMANDS = ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "ip", "iptables", "conntrack")
CNI_BIN_DIR = Path("/usr/lib/cni")
CNI_PLUGINS = ("bridge", "host-local", "loopback", "portmap")


def _run(argv: list[str], check: bool = True, **kw: Any) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise KubeHarnessError(f"`{' '.join(argv)}` failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def check_host() -> None:
    """Fail (never skip) naming what is missing and how dev/bootstrap installs it."""
    missing = [c for c in HOST_COMMANDS if shutil.which(c) is None]
    missing += [f"{CNI_BIN_DIR}/{p}" for p in CNI_PLUGINS if not (CNI_BIN_DIR / p).exists()]
    if missing:
        raise KubeHarnessError(
            f"the real test node needs {', '.join(missing)}; install Debian's containerd, runc, "
            "containernetworking-plugins, iptables, conntrack and iproute2 (`dev/bootstrap` does) and rerun."
        )
    if os.geteuid() != 0:
        raise KubeHarnessError("the real test node runs kubelet and containerd, which need root; run the tests as root.")


def network_guard() -> None:
    """Install the blackholes, the bridge and its routing table; idempotent (see the module doc)."""
    for cidr in BLACKHOLES:
        _run(["ip", "route", "replace", "blackhole", cidr])
    if _run(["ip", "link", "show", BRIDGE], check=False).returncode != 0:
        _run(["ip", "link", "add", BRIDGE, "type", "bridge"])
    prefix = POD_SUBNET.split("/")[1]
    _run(["ip", "addr", "replace", f"{GATEWAY_IP}/{prefix}", "dev", BRIDGE])
    _run(["ip", "link", "set", BRIDGE, "address", BRIDGE_MAC])
    _run(["ip", "link", "set", BRIDGE, "up"])
    _run(["ip", "route", "replace", POD_SUBNET, "dev", BRIDGE, "table", str(ROUTE_TABLE)])
    _run(["ip", "route", "replace", "blackhole", "default", "table", str(ROUTE_TABLE)])
    rules = _run(["ip", "rule", "show", "priority", str(RULE_PRIORITY)]).stdout
    if f"iif {BRIDGE}" not in rules:
        _run(["ip", "rule", "add", "priority", str(RULE_PRIORITY), "iif", BRIDGE, "lookup", str(ROUTE_TABLE)])
    # pods reach Services through the host (forwarding) and see replies from peers on the
    # same bridge de-NATed (bridged frames pass through iptables)
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
    bridge_nf = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
    if not bridge_nf.exists():
        raise KubeHarnessError("the kernel has no br_netfilter (/proc/sys/net/bridge); Service replies on the bridge "
                               "would not be de-NATed. Load br_netfilter and rerun.")
    bridge_nf.write_text("1")


def bridge_mac() -> str:
    """The bridge's MAC address as the kernel reports it now."""
    return json.loads(_run(["ip", "-j", "link", "show", BRIDGE]).stdout)[0]["address"]


def guard_problems() -> list[str]:
    """What is missing of the network guard, read back from the kernel (empty when all is in place)."""
    problems = []
    routes = _run(["ip", "route", "show", "type", "blackhole"]).stdout
    problems += [f"no blackhole route for {c}" for c in BLACKHOLES if c not in routes]
    table = _run(["ip", "route", "show", "table", str(ROUTE_TABLE)]).stdout
    if "blackhole default" not in table:
        problems.append(f"table {ROUTE_TABLE} has no blackhole default")
    if f"iif {BRIDGE} lookup {ROUTE_TABLE}" not in _run(["ip", "rule", "show"]).stdout:
        problems.append(f"no rule sends packets from {BRIDGE} to table {ROUTE_TABLE}")
    mac = bridge_mac()
    if mac != BRIDGE_MAC:
        problems.append(f"{BRIDGE} has MAC {mac}, not its own {BRIDGE_MAC}: it follows its ports'")
    return problems


def node_kubeconfig(cluster: KubeCluster, path: Path) -> Path:
    """A client certificate for system:node:NAME in system:nodes, signed by the test CA, so the
    Node authorizer and NodeRestriction treat this kubelet as they would on a real cluster."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    pki = cluster.ca_file.parent
    ca_cert = x509.load_pem_x509_certificate(cluster.ca_file.read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:nodes"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, f"system:node:{NODE_NAME}")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_file, key_file = path.with_suffix(".crt"), path.with_suffix(".key")
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    cfg = kubeconfig_dict(cluster.server, cluster.ca_file.read_bytes(), "unused", f"system:node:{NODE_NAME}")
    user = cfg["users"][0]["user"]
    user.pop("token", None)
    user["client-certificate"], user["client-key"] = str(cert_file), str(key_file)
    path.write_text(yaml.safe_dump(cfg))
    path.chmod(0o600)
    return path


def containerd_config(root: Path, state: Path, socket: Path, cni_conf: Path) -> str:
    """containerd 1.6 (config version 2): CRI with runc under cgroupfs (this machine has cgroup v1),
    overlayfs, our pause image, Debian's CNI plugins; registries are never reached."""
    return f"""version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{socket}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  enable_unprivileged_ports = true
  # this machine's root may not lower oom_score_adj (no CAP_SYS_RESOURCE over its own value):
  # clamp to containerd's own instead of failing every sandbox at runc's nsexec
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{cni_conf}"
"""


def cni_conflist(ipam_dir: Path) -> dict[str, Any]:
    return {
        "cniVersion": "0.4.0",
        "name": "hubml",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,  # nothing is ever source-NATed out of the bridge
                "hairpinMode": True,  # a pod reaches itself through its Service
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_SUBNET, "gateway": GATEWAY_IP, "rangeStart": "10.245.0.10"}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(ipam_dir),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_config(port: int, healthz_port: int, resolv: Path, pod_logs: Path) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        # this machine mounts cgroup v1 (hybrid); kubelet >= 1.35 refuses it unless told
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "address": GATEWAY_IP,
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        # the API server calls it for logs/exec without a client certificate (test cluster only)
        "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        "clusterDNS": [GATEWAY_IP],
        "clusterDomain": "cluster.local",
        "resolvConf": str(resolv),
        "podLogsDir": str(pod_logs),  # not /var/log/pods: everything of a run stays in its state dir
        "failSwapOn": False,
        "registerWithTaints": [REAL_NODE_TAINT],
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "200Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "serializeImagePulls": False,
        "syncFrequency": "10s",
        "nodeStatusUpdateFrequency": "5s",
        "shutdownGracePeriod": "0s",
        "maxPods": 50,
        "podPidsLimit": -1,
    }


def corefile(kubeconfig: Path, port: int) -> str:
    return f""".:53 {{
    bind {GATEWAY_IP}
    errors
    health 127.0.0.1:{port}
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
        ttl 2
    }}
}}
"""


@dataclass
class RealNode:
    """The running node's processes and what tests need to reach it."""

    name: str
    state_dir: Path
    containerd_socket: Path
    pids: dict[str, int] = field(default_factory=dict)
    binaries: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False)
    images: list[str] = field(default_factory=list)

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run(["ctr", "--address", str(self.containerd_socket), "-n", "k8s.io", *args], check=check)

    def pod_log_tails(self, since: float, lines: int = 150) -> str:
        """The last ``lines`` of every container log kubelet wrote to after ``since`` (epoch
        seconds): what a failed real-node test attaches, since its pods and their logs go
        with its namespace once the test is over."""
        out = []
        for log in sorted((self.state_dir / "pod-logs").glob("*/*/*.log")):
            try:
                if log.stat().st_mtime < since:
                    continue
                text = log.read_text(errors="replace").splitlines()[-lines:]
            except OSError:  # rotated or removed while we read
                continue
            pod_dir, container = log.parent.parent.name, log.parent.name
            namespace, pod = pod_dir.split("_")[:2]
            out.append(f"--- {namespace}/{pod} [{container}] {log.name} (last {len(text)} lines)\n" + "\n".join(text))
        return "\n".join(out)

    def import_image(self, image: NodeImage) -> None:
        """Import a docker-archive unless containerd already holds that name at that archive's key."""
        key_label = "hubml.io/archive=" + image.archive.name
        rows = [line for line in self.ctr("images", "ls").stdout.splitlines()[1:] if line.strip()]
        if any(line.split()[0] == image.name and key_label in line for line in rows):
            self.images.append(image.name)
            return
        if any(line.split()[0] == image.name for line in rows):
            # an earlier build of it: let containerd free it before the new one lands, or the
            # disk holds both (~14 GB each for the torch images: packed content + unpacked
            # snapshot) and kubelet's image GC starts removing what the tests need
            self.ctr("images", "rm", "--sync", image.name)
            self.prune_unnamed()
        self.ctr("images", "import", str(image.archive))
        # pinned: kubelet's image GC never removes it; the label records which archive it came from
        self.ctr("images", "label", image.name, "io.cri-containerd.pinned=pinned", key_label)
        self.images.append(image.name)
        self.prune_unnamed()

    def host_container_argv(self, image: str, name: str, argv: list[str], env: dict[str, str],
                            read_only: list[Path]) -> list[str]:
        """The command line of ``ctr run`` for a container of ``image`` in the host's network
        namespace (outside Kubernetes: a process started from an image's filesystem, as a hub
        runs a managed service), the image's user, ``read_only`` folders bind-mounted at their
        own paths. ``ctr`` stays in the foreground and forwards signals; ``--rm`` removes the
        container when it ends (``remove_container`` covers a ``ctr`` that was killed)."""
        cmd = ["ctr", "--address", str(self.containerd_socket), "-n", "k8s.io", "run", "--rm", "--net-host"]
        for key, value in sorted(env.items()):
            cmd += ["--env", f"{key}={value}"]
        for folder in read_only:
            cmd += ["--mount", f"type=bind,src={folder},dst={folder},options=rbind:ro"]
        return [*cmd, image, name, *argv]

    def remove_container(self, name: str) -> None:
        self.ctr("tasks", "kill", "-s", "SIGKILL", name, check=False)
        self.ctr("tasks", "delete", "-f", name, check=False)
        self.ctr("containers", "delete", name, check=False)

    def prune_unnamed(self) -> None:
        """Drop the `sha256:<id>` references CRI keeps for images no name points at any more (an
        earlier build of a re-imported image), so the cached content store does not grow by GiBs
        with every rebuild; containerd's garbage collector then frees their content."""
        rows = [line.split() for line in self.ctr("images", "ls").stdout.splitlines()[1:] if line.strip()]
        named = {row[2] for row in rows if not row[0].startswith("sha256:")}
        for row in rows:
            if row[0].startswith("sha256:") and row[2] not in named:
                self.ctr("images", "rm", "--sync", row[0], check=False)


def start_real_node(cluster: KubeCluster, state_dir: Path | None = None, timeout: float = 120.0,
                    extra_images: list[NodeImage] | None = None) -> RealNode:
    """Guard the network, start containerd, import the images, then kubelet, kube-proxy and
    CoreDNS; return once the node is Ready and advertises its GPUs. On failure everything
    started is stopped and the error names the process and its log tail."""
    check_host()
    binaries = find_binaries(NODE_BINARIES)
    network_guard()
    state_dir = Path(state_dir or cluster.state_dir / "node")
    logs = state_dir / "logs"
    for d in (logs, state_dir / "cni", state_dir / "ipam", state_dir / "kubelet"):
        d.mkdir(parents=True, exist_ok=True)
    persist = cache_root() / "node" / "containerd"
    persist.mkdir(parents=True, exist_ok=True)
    run_dir = Path(f"/run/hubml-node-{os.getpid()}")
    run_dir.mkdir(parents=True, exist_ok=True)
    socket = run_dir / "containerd.sock"
    node = RealNode(NODE_NAME, state_dir, socket,
                    binaries={"containerd": "containerd", **{k: str(v) for k, v in binaries.items()}})
    (state_dir / "cni" / "10-hubml.conflist").write_text(json.dumps(cni_conflist(state_dir / "ipam"), indent=1))
    (state_dir / "containerd.toml").write_text(containerd_config(persist, run_dir / "state", socket, state_dir / "cni"))
    resolv = state_dir / "resolv.conf"
    resolv.write_text("# pods get cluster DNS only (no upstream)\n")

    def spawn(name: str, argv: list[str]) -> None:
        with open(logs / f"{name}.log", "ab") as logf:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, cwd=state_dir)
        node.pids[name], node.procs[name] = proc.pid, proc

    def wait(what: str, probe: Any, until: float) -> None:
        while True:
            for name, proc in node.procs.items():
                if proc.poll() is not None:
                    raise KubeHarnessError(f"{name} exited while waiting for {what}; last lines of "
                                           f"{logs / (name + '.log')}:\n{log_tail(logs / f'{name}.log')}")
            with contextlib.suppress(OSError, KeyError, TypeError, ValueError, KubeHarnessError):
                if probe():
                    return
            if time.monotonic() > until:
                raise KubeHarnessError(f"timed out after {timeout:.0f} s waiting for {what}; logs in {logs}")
            time.sleep(0.2)

    deadline = time.monotonic() + timeout
    try:
        spawn("containerd", ["containerd", "--config", str(state_dir / "containerd.toml"), "--log-level", "warn"])
        wait("containerd's socket", lambda: node.ctr("version", check=False).returncode == 0, deadline)
        for image in [pause_image(), busybox_image(), *(extra_images or [])]:
            node.import_image(image)
        kubeconfig = node_kubeconfig(cluster, state_dir / "kubelet.kubeconfig")
        config = state_dir / "kubelet.yaml"
        healthz = free_port()
        config.write_text(yaml.safe_dump(kubelet_config(free_port(), healthz, resolv, state_dir / "pod-logs")))
        labels = ",".join(f"{k}={v}" for k, v in REAL_NODE_LABELS.items())
        spawn("kubelet", [
            str(binaries["kubelet"]), f"--config={config}", f"--kubeconfig={kubeconfig}",
            f"--container-runtime-endpoint=unix://{socket}", f"--hostname-override={NODE_NAME}",
            f"--node-ip={GATEWAY_IP}", f"--root-dir={state_dir / 'kubelet'}", f"--cert-dir={state_dir / 'kubelet-pki'}",
            f"--node-labels={labels}", "--v=1",
        ])
        spawn("kube-proxy", [
            str(binaries["kube-proxy"]), f"--kubeconfig={cluster.kubeconfig}", f"--hostname-override={NODE_NAME}",
            "--proxy-mode=iptables", f"--cluster-cidr={POD_SUBNET}",
            f"--healthz-bind-address=127.0.0.1:{free_port()}", f"--metrics-bind-address=127.0.0.1:{free_port()}",
            "--conntrack-max-per-core=0", "--v=1",
        ])
        dns_health = free_port()
        (state_dir / "Corefile").write_text(corefile(cluster.kubeconfig, dns_health))
        spawn("coredns", [str(binaries["coredns"]), "-conf", str(state_dir / "Corefile")])
        rest = cluster.rest

        def ready() -> bool:
            status, obj = rest.request("GET", f"/api/v1/nodes/{NODE_NAME}")
            conds = {c["type"]: c["status"] for c in obj.get("status", {}).get("conditions", [])} if status == 200 else {}
            return conds.get("Ready") == "True"

        wait(f"node {NODE_NAME} Ready (kubelet + containerd + CNI)", ready, deadline)
        # what the NVIDIA device plugin would report; the Node status subresource keeps
        # extended resources kubelet does not manage
        rest.must("PATCH", f"/api/v1/nodes/{NODE_NAME}/status",
                  {"status": {"capacity": {"nvidia.com/gpu": str(ADVERTISED_GPUS)}}},
                  content_type="application/merge-patch+json")
        wait("nvidia.com/gpu allocatable on the real node", lambda: node_summary(cluster).get("gpus") == ADVERTISED_GPUS,
             deadline)

        def dns_ok() -> bool:
            import http.client

            conn = http.client.HTTPConnection("127.0.0.1", dns_health, timeout=2)
            try:
                conn.request("GET", "/health")
                return conn.getresponse().status == 200
            finally:
                conn.close()

        wait("CoreDNS /health", dns_ok, deadline)
        return node
    except BaseException:
        stop_real_node(cluster, node)
        raise


def node_summary(cluster: KubeCluster) -> dict[str, Any]:
    """The real node as the scheduler and HubMLSpawner's availability see it: Ready, its
    taints (the node lifecycle controller adds not-ready/unreachable ones when kubelet's
    heartbeats lag, e.g. while a multi-GB image is imported on a loaded machine) and its
    allocatable GPUs."""
    status, obj = cluster.rest.request("GET", f"/api/v1/nodes/{NODE_NAME}")
    if status != 200:
        return {"found": False, "status": status}
    conds = {c["type"]: c["status"] for c in obj.get("status", {}).get("conditions", [])}
    return {"ready": conds.get("Ready") == "True",
            "taints": sorted(f"{t['key']}:{t['effect']}" for t in obj.get("spec", {}).get("taints") or []),
            "gpus": int(obj.get("status", {}).get("allocatable", {}).get("nvidia.com/gpu", "0"))}


def ready_for_gpu_pods(cluster: KubeCluster) -> bool:
    """Ready, no taint but its own, every advertised GPU allocatable."""
    s = node_summary(cluster)
    return (s.get("ready") is True and s["taints"] == [f"{REAL_NODE_TAINT['key']}:{REAL_NODE_TAINT['effect']}"]
            and s["gpus"] == ADVERTISED_GPUS)


def stop_real_node(cluster: KubeCluster, node: RealNode, timeout: float = 20.0) -> None:
    """Stop kubelet first (so nothing restarts), then every container containerd runs, then the
    daemons; unmount what kubelet mounted; remove kube-proxy's rules and the Node object."""
    kubelet = {k: v for k, v in node.pids.items() if k == "kubelet"}
    stop_processes(kubelet, node.binaries, node.procs, timeout)
    if "containerd" in node.pids and node.procs["containerd"].poll() is None:
        for sandbox in _lines(node.ctr("tasks", "ls", "-q", check=False).stdout):
            node.ctr("tasks", "kill", "-s", "SIGKILL", sandbox, check=False)
        time.sleep(0.5)
        for task in _lines(node.ctr("tasks", "ls", "-q", check=False).stdout):
            node.ctr("tasks", "delete", "-f", task, check=False)
        for container in _lines(node.ctr("containers", "ls", "-q", check=False).stdout):
            node.ctr("containers", "delete", container, check=False)
    rest = {k: v for k, v in node.pids.items() if k != "kubelet"}
    stop_processes(rest, node.binaries, node.procs, timeout)
    _run([node.binaries.get("kube-proxy", "kube-proxy"), "--cleanup"], check=False)
    _unmount_under(node.state_dir / "kubelet")
    _unmount_under(node.containerd_socket.parent)
    shutil.rmtree(node.containerd_socket.parent, ignore_errors=True)
    for ns in Path("/run/netns").glob("cni-*") if Path("/run/netns").exists() else []:
        _run(["ip", "netns", "delete", ns.name], check=False)
    with contextlib.suppress(Exception):
        cluster.rest.request("DELETE", f"/api/v1/nodes/{NODE_NAME}")
    node.pids.clear()


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _unmount_under(root: Path) -> None:
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(str(root))), key=len, reverse=True):
        _run(["umount", "-l", mount], check=False)
