"""Fixtures of the real-node tests: hubml's images in the node's containerd, an MLflow
server the pods reach, and a way to run the hub service from the hub image."""

from __future__ import annotations

import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hubml_testing.images import image_archives
from hubml_testing.kube_node import GATEWAY_IP
from hubml_testing.mlflow_server import MlflowServer, _stop, start_mlflow_server
from hubml_testing.node_images import NodeImage
from hubml_testing.real_pods import HUB, SERVING, SINGLEUSER


def _on_node(real_node, image: str, short: str) -> str:
    archive = image_archives([short])[image]
    real_node.import_image(NodeImage(image, archive))  # found by its archive's key when already there
    return image


@pytest.fixture(scope="session")
def singleuser_on_node(real_node) -> str:
    """The single-user image built from its Dockerfile, in the node's containerd (the first
    run imports 6.6 GB: ~2.5 min)."""
    return _on_node(real_node, SINGLEUSER, "singleuser")


@pytest.fixture(scope="session")
def serving_on_node(real_node) -> str:
    """The serving image (MLflow's scoring server with torch) for the Deployment flavour."""
    return _on_node(real_node, SERVING, "serving")


@pytest.fixture(scope="session")
def hub_image_on_node(real_node) -> str:
    """The hub image (what hubml's hub service runs from in the chart)."""
    return _on_node(real_node, HUB, "hub")


@pytest.fixture(scope="session")
def pod_mlflow() -> Iterator[MlflowServer]:
    """An MLflow server on the node's address: what the pods' MLFLOW_TRACKING_URI names."""
    root = Path(tempfile.mkdtemp(prefix="hubml-node-mlflow-"))
    server, proc = start_mlflow_server(root, host=GATEWAY_IP)
    try:
        yield server
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def in_hub_image(real_node, hub_image_on_node) -> Iterator[Callable[[list[str], dict[str, str], Path], list[str]]]:
    """A launcher for ``start_stack``: the hub service runs from the hub image (its own
    filesystem and Python, so a dependency the image lacks fails the test), in a container
    on the host's network, as the chart's hub pod runs it beside JupyterHub."""
    containers: list[str] = []

    def launch(args: list[str], env: dict[str, str], share: Path) -> list[str]:
        share.chmod(0o755)  # the image runs as uid 1000: let it read its config and kubeconfig
        for path in share.iterdir():
            if path.is_file():
                path.chmod(0o644)
        containers.append(f"hubml-service-{secrets.token_hex(3)}")
        return real_node.host_container_argv(hub_image_on_node, containers[-1], ["tini", "--", "python3", *args],
                                             env, [share])

    yield launch
    for name in containers:  # normally gone already (ctr run --rm); not when ctr itself was killed
        real_node.remove_container(name)


_STARTED = pytest.StashKey[float]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_STARTED] = time.time()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """A failed real-node test carries its pods' logs: the namespace (and kubelet's copy of
    the logs) is gone once its fixtures are torn down, and the cause of a failure on a real
    pod is usually in a pod's log, not in the test's assertion."""
    outcome = yield
    report = outcome.get_result()
    node = getattr(item, "funcargs", {}).get("real_node")
    if not report.failed or node is None or report.when == "teardown":
        return
    tails = node.pod_log_tails(since=item.stash.get(_STARTED, 0.0))
    report.sections.append(("pod logs (real node)", tails or "(no container wrote a log during this test)"))
