"""Pure parts of the Kubernetes harness: topology, node/pod manifests, the
outcome-annotation contract and kubeconfigs. No cluster needed."""

from __future__ import annotations

import base64
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from hubml_testing.kube_binaries import KUBE_DEV_DIR, REPO_ROOT, KubeHarnessError, read_versions
from hubml_testing.kube_cluster import KubeCluster
from hubml_testing.kube_crds import CRDS, crd_file, kserve_versions, load_crd
from hubml_testing.kube_manifests import SCALE_LABEL, kubeconfig_dict, load_topology, outcome_annotations, scale_nodes, scale_pods, topology_nodes

GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


@pytest.fixture(scope="module")
def topology() -> dict:
    return load_topology()


def by_name(nodes: list[dict]) -> dict[str, dict]:
    return {n["metadata"]["name"]: n for n in nodes}


def test_topology_has_the_nodes_the_issue_lists(topology: dict) -> None:
    nodes = by_name(topology_nodes(topology))
    full_a100 = [n for n in nodes.values()
                 if n["metadata"]["labels"].get("nvidia.com/gpu.product") == "NVIDIA-A100-SXM4-80GB"
                 and n["status"]["allocatable"].get("nvidia.com/gpu") == "8"]
    assert len(full_a100) == 2
    mig_a100 = nodes["gpu-a100-mig-0"]
    assert mig_a100["metadata"]["labels"]["nvidia.com/mig.strategy"] == "mixed"
    assert mig_a100["status"]["allocatable"]["nvidia.com/mig-1g.10gb"] == "16"
    assert mig_a100["status"]["allocatable"]["nvidia.com/mig-3g.40gb"] == "8"
    assert "nvidia.com/gpu" not in mig_a100["status"]["allocatable"]
    h100 = nodes["gpu-h100-mig-0"]
    assert h100["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert h100["metadata"]["labels"]["nvidia.com/mig.strategy"] == "mixed"
    assert any(k.startswith("nvidia.com/mig-") for k in h100["status"]["allocatable"])
    t4 = nodes["gpu-t4-shared-0"]["metadata"]["labels"]
    assert t4["nvidia.com/gpu.sharing-strategy"] == "time-slicing"
    assert t4["nvidia.com/gpu.replicas"] == "4"
    assert nodes["gpu-t4-shared-0"]["status"]["allocatable"]["nvidia.com/gpu"] == "4"
    cpu_only = [n for n in nodes.values() if not any(k.startswith("nvidia.com/") for k in n["status"]["allocatable"])]
    assert sorted(n["metadata"]["name"] for n in cpu_only) == ["cpu-0", "cpu-1"]


def test_gpu_nodes_carry_gfd_labels_and_the_gpu_taint(topology: dict) -> None:
    for node in topology_nodes(topology):
        labels = node["metadata"]["labels"]
        alloc = node["status"]["allocatable"]
        assert {"cpu", "memory", "pods"} <= set(alloc)
        assert alloc == node["status"]["capacity"]
        assert labels["kubernetes.io/hostname"] == node["metadata"]["name"]
        assert node["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"
        is_gpu = any(k.startswith("nvidia.com/") for k in alloc)
        if is_gpu:
            assert GPU_TAINT in node["spec"]["taints"]
            for key in ("nvidia.com/gpu.product", "nvidia.com/gpu.memory", "nvidia.com/gpu.count",
                        "nvidia.com/mig.strategy", "nvidia.com/gpu.sharing-strategy", "nvidia.com/gpu.replicas"):
                assert key in labels, (node["metadata"]["name"], key)
            # every MIG resource advertised has its GFD per-profile labels
            for res in alloc:
                if res.startswith("nvidia.com/mig-"):
                    assert labels[f"{res}.count"] == alloc[res]
                    assert f"{res}.memory" in labels
        else:
            assert node["spec"]["taints"] == []
            assert "nvidia.com/gpu.product" not in labels


def test_scale_nodes_split_exactly_and_are_tainted(topology: dict) -> None:
    nodes = scale_nodes(topology, 1000)
    assert len(nodes) == 1000
    assert len({n["metadata"]["name"] for n in nodes}) == 1000
    profiles = Counter(n["metadata"]["name"].rsplit("-", 1)[0].removeprefix("scale-") for n in nodes)
    mix = topology["scale"]["mix"]
    assert profiles == {p: 1000 * w // sum(mix.values()) for p, w in mix.items()}
    assert all({"key": SCALE_LABEL, "value": "true", "effect": "NoSchedule"} in n["spec"]["taints"] for n in nodes)
    # an odd count still adds up
    assert len(scale_nodes(topology, 7)) == 7
    with pytest.raises(ValueError, match=">= 1"):
        scale_nodes(topology, 0)


def test_scale_pods_are_bound_round_robin() -> None:
    pods = scale_pods(["a", "b", "c"], 10, "ns")
    assert [p["spec"]["nodeName"] for p in pods[:4]] == ["a", "b", "c", "a"]
    assert len({p["metadata"]["name"] for p in pods}) == 10
    assert all(p["metadata"]["namespace"] == "ns" for p in pods)
    assert pods[0]["spec"]["tolerations"] == [{"operator": "Exists"}]
    with pytest.raises(ValueError, match="node name"):
        scale_pods([], 3, "ns")


def test_outcome_annotations_contract() -> None:
    assert outcome_annotations("succeed") == {"kwok.hubml.io/outcome": "succeed"}
    assert outcome_annotations("fail", exit_code=137, reason="OOMKilled", delay="2s") == {
        "kwok.hubml.io/outcome": "fail",
        "kwok.hubml.io/exit-code": "137",
        "kwok.hubml.io/reason": "OOMKilled",
        "kwok.hubml.io/delay": "2s",
    }


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"outcome": "crash"}, "outcome must be one of"),
        ({"outcome": ""}, "outcome must be one of"),
        ({"outcome": "succeed", "exit_code": 1}, "only apply to outcome='fail'"),
        ({"outcome": "fail", "exit_code": 0}, "1..255"),
        ({"outcome": "fail", "exit_code": 256}, "1..255"),
        ({"outcome": "fail", "exit_code": "3"}, "1..255"),
        ({"outcome": "fail", "exit_code": True}, "1..255"),
        ({"outcome": "fail", "reason": "out of memory"}, "CamelCase"),
        ({"outcome": "fail", "reason": "OOM\nKilled"}, "CamelCase"),
        ({"outcome": "run", "delay": "soon"}, "Go duration"),
        ({"outcome": "run", "delay": "5"}, "Go duration"),
    ],
)
def test_outcome_annotations_reject_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        outcome_annotations(**kwargs)


def test_kubeconfig_dict_round_trips_through_from_kubeconfig(tmp_path: Path) -> None:
    cfg = kubeconfig_dict("https://127.0.0.1:6443", b"PEM", "tok", "alice", "team-a")
    assert base64.b64decode(cfg["clusters"][0]["cluster"]["certificate-authority-data"]) == b"PEM"
    assert cfg["contexts"][0]["context"] == {"cluster": "hubml-test", "user": "alice", "namespace": "team-a"}
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(cfg))
    cluster = KubeCluster.from_kubeconfig(path)
    assert (cluster.server, cluster.token, cluster.ca_file.read_bytes()) == ("https://127.0.0.1:6443", "tok", b"PEM")
    assert cluster.owned is False


@pytest.mark.parametrize(
    "text",
    ["", "not: [a kubeconfig", "apiVersion: v1\nkind: Config\n", "current-context: x\ncontexts: []\n"],
)
def test_from_kubeconfig_rejects_foreign_files(tmp_path: Path, text: str) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text(text)
    with pytest.raises(KubeHarnessError, match="unset HUBML_KUBECONFIG"):
        KubeCluster.from_kubeconfig(path)


@pytest.mark.parametrize("release", ["current", "previous"])
def test_crd_files_match_their_names(release: str) -> None:
    for short, name in CRDS.items():
        crd = load_crd(crd_file(short, release))
        assert crd["metadata"]["name"] == f"{crd['spec']['names']['plural']}.{crd['spec']['group']}" == name
        assert crd["spec"]["names"]["singular"] == short


def test_kserve_releases_differ_in_standard_mode_canaries() -> None:
    """The two pinned KServe releases are the two shapes hub_ext detects."""
    def spec_props(release: str) -> dict:
        crd = load_crd(crd_file("inferenceservice", release))
        return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]

    assert spec_props("current")["canary"]["items"]["required"] == ["predictor", "trafficPercent"]
    assert "canary" not in spec_props("previous")
    assert kserve_versions()["current"] != kserve_versions()["previous"]


def test_versions_file_pins_every_binary() -> None:
    versions = read_versions()
    assert versions["KUBE_VERSION"].startswith("v1.")
    assert versions["KUBE_STAGING_VERSION"] == "v0." + versions["KUBE_VERSION"].split(".", 1)[1]
    assert {"ETCD_VERSION", "KWOK_VERSION", "HELM_VERSION", "KSERVE_VERSION", "KSERVE_PREVIOUS_VERSION"} <= set(versions)


def run_cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "tests"), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "hubml_testing.kube_cli", *args], capture_output=True, text=True,
                          env=env, timeout=60)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["up", "--without-crd", "bogus"], "invalid choice: 'bogus'"),
        (["launch"], "invalid choice: 'launch'"),
        ([], "required"),
        (["scale", "--nodes", "many"], "invalid int value"),
    ],
)
def test_cli_rejects_bad_arguments(args: list[str], match: str) -> None:
    res = run_cli(*args)
    assert res.returncode == 2
    assert match in res.stderr


def test_cli_down_and_status_without_a_cluster(tmp_path: Path) -> None:
    state = tmp_path / "nothing-here"
    res = run_cli("down", "--state-dir", str(state))
    assert res.returncode == 0 and "nothing to stop" in res.stderr
    res = run_cli("status", "--state-dir", str(state))
    assert res.returncode == 1 and "no healthy control plane" in res.stderr
    res = run_cli("scale", "--state-dir", str(state))
    assert res.returncode == 1 and "dev/kube-up first" in res.stderr
    assert not state.exists()


def test_cli_up_without_binaries_fails_with_the_build_command(tmp_path: Path) -> None:
    state = tmp_path / "state"
    res = run_cli("up", "--state-dir", str(state), env_extra={"HUBML_KUBE_CACHE": str(tmp_path / "empty-cache")})
    assert res.returncode == 1
    assert "dev/kube/build.sh" in res.stderr and "kube-apiserver" in res.stderr
    assert res.stdout == ""
    assert not state.exists()


BUILD_SH = Path(KUBE_DEV_DIR) / "build.sh"


def run_build(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(["bash", str(BUILD_SH), *args], capture_output=True, text=True,
                          env={**os.environ, **(env_extra or {})}, timeout=300)


@pytest.mark.kube  # needs the binaries built by dev/kube/build.sh
def test_build_sh_reuses_cached_binaries() -> None:
    res = run_build()
    assert res.returncode == 0, res.stderr
    for name in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kwok", "helm"):
        assert f"reuse  {name} (" in res.stdout
    assert "built: none;" in res.stdout


def test_build_sh_rejects_unknown_binary_names() -> None:
    res = run_build("kube-router")  # a real Kubernetes binary, but not one the harness builds
    assert res.returncode == 1
    assert "unknown binary 'kube-router'" in res.stderr and "kube-apiserver" in res.stderr and "kubelet" in res.stderr


def test_build_sh_fails_loudly_when_go_cannot_build(tmp_path: Path) -> None:
    # No proxy and an empty module cache: the download must fail, with the reason.
    res = run_build("etcd", env_extra={"HUBML_KUBE_CACHE": str(tmp_path / "cache"),
                                       "GOPROXY": "off", "GOMODCACHE": str(tmp_path / "mod")})
    assert res.returncode == 1
    assert "FAILED: go build of etcd" in res.stderr
    assert "module lookup disabled by GOPROXY=off" in res.stderr
    bins = list((tmp_path / "cache").glob("kube-*/bin/*"))
    assert bins == []  # no half-built binary and no stamp left behind


def test_every_node_gets_its_own_internal_ip(topology: dict) -> None:
    nodes = topology_nodes(topology) + scale_nodes(topology, 300)
    ips = [next(a["address"] for a in n["status"]["addresses"] if a["type"] == "InternalIP") for n in nodes]
    assert len(set(ips)) == len(nodes)
    assert ips[0] == "127.0.1.1"
