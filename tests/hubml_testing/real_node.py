"""Pytest plugin: a real kubelet node in the session's control plane (issue 11).

Fixtures
--------
``real_node`` (session)
    A :class:`hubml_testing.kube_node.RealNode` named ``hubml-node-0``: containerd + runc,
    CNI bridge ``hubml0`` (pods in 10.245.0.0/24), kubelet, kube-proxy (iptables) and
    CoreDNS (at 10.245.0.1, the node's address, ``cluster.local`` only). It is tainted
    ``hubml.io/real-node=true:NoSchedule``: give a pod ``REAL_NODE_TOLERATION`` (and, to be
    sure of the node, ``nodeSelector: {hubml.io/node: real}``) to run it for real. It advertises
    ``nvidia.com/gpu: 2`` (workloads run on the CPU). Images present: ``hubml.local/pause``,
    ``hubml.local/busybox`` and whatever a test imports with ``real_node.import_image``.

Tests marked ``node`` run after every other test (``pytest_collection_modifyitems``
below), so the extra node's GPUs and taint never change what the kwok-only tests see.
A host without containerd, runc, the CNI plugins or root fails these tests; nothing is skipped.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hubml_testing.kube_binaries import KubeHarnessError
from hubml_testing.kube_cluster import KubeCluster
from hubml_testing.kube_node import RealNode, start_real_node, stop_real_node


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("node") is not None)  # stable: order kept otherwise


@pytest.fixture(scope="session")
def real_node(kube_cluster: KubeCluster) -> Iterator[RealNode]:
    if not kube_cluster.owned:
        pytest.fail("the real node joins only a control plane this test run started (unset HUBML_KUBECONFIG)",
                    pytrace=False)
    try:
        node = start_real_node(kube_cluster)
    except KubeHarnessError as exc:
        pytest.fail(f"the real test node could not start: {exc}", pytrace=False)
    try:
        yield node
    finally:
        stop_real_node(kube_cluster, node)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "node: runs real pods on the real kubelet node (containerd, CNI, kube-proxy, CoreDNS); ordered last"
    )
