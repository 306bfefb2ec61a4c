"""The local backend's registry and serving, driven directly (no kernel).

Real MLflow store (sqlite, and once through a real ``mlflow server``), real
models logged by MLflow, real ``mlflow models serve`` processes answering HTTP.
Every test ends with no model server left (checked by ``no_servers_left``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from hubml.errors import BackendError, Conflict, InvalidRequest, NotFound
from hubml.magics.local import model_server
from hubml.magics.local.backend import LocalBackend
from hubml.magics.local.home import LocalHome
from hubml.models import DeploySpec, ModelRef, RegisterRequest
from hubml_testing.kernel import describe, wait_no_processes
from hubml_testing.model_runs import SETOSA, log_runs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store() -> tuple[LocalHome, dict[str, str]]:
    """One sqlite store for the module, with four real runs logged by MLflow."""
    root = Path(tempfile.mkdtemp(prefix="hubml-models-"))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    (root / "cwd").mkdir()
    runs = log_runs(uri, {"v1": {"artifact_path": "model", "shift": 0},
                          "v2": {"artifact_path": "model", "shift": 1},
                          "other_path": {"artifact_path": "clf", "shift": 2},
                          "bare": {"artifact_path": None}}, cwd=str(root / "cwd"))
    home = LocalHome(root=root, tracking_uri=uri)
    yield home, runs
    left = wait_no_processes(root, timeout=15)
    for proc in left:
        proc.kill()
    shutil.rmtree(root, ignore_errors=True)
    assert not left, f"model servers left running:\n{describe(left)}"


@pytest.fixture(scope="module")
def home(store) -> LocalHome:
    return store[0]


@pytest.fixture(scope="module")
def runs(store) -> dict[str, str]:
    return store[1]


@pytest.fixture(scope="module")
def models(home: LocalHome, runs: dict[str, str]) -> LocalBackend:
    backend = LocalBackend(home)
    backend.register_model(RegisterRequest(name="iris-clf", run_id=runs["v1"], alias="champion",
                                           tags={"team": "ml"}).validate())
    backend.register_model(RegisterRequest(name="iris-clf", run_id=runs["v2"]).validate())
    return backend


@pytest.fixture
def no_servers_left(home: LocalHome):
    yield
    left = wait_no_processes(home.root, timeout=15)
    assert not left, f"model servers left running:\n{describe(left)}"
    assert not list(home.deployments_dir.glob("*.json")), "a deployment record was left behind"
    assert not list(home.deployments_dir.glob("*.log")), "a server log was left behind"


def _post(url: str, body: dict) -> object:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def test_registry_versions_aliases_and_resolution(models: LocalBackend, runs: dict[str, str]) -> None:
    listed = {m.name: m for m in models.models()}
    clf = listed["iris-clf"]
    assert [v.version for v in clf.versions] == [1, 2]
    assert clf.aliases == {"champion": 1}
    assert clf.versions[0].aliases == ["champion"] and clf.versions[1].aliases == []
    assert clf.versions[0].run_id == runs["v1"] and clf.versions[1].run_id == runs["v2"]
    assert clf.versions[0].tags == {"team": "ml"}
    assert models.resolve(ModelRef.parse("iris-clf@champion")).version == 1
    assert models.resolve(ModelRef.parse("iris-clf/2")).version == 2
    assert models.resolve(ModelRef.parse("iris-clf")).version == 2  # bare name = latest


def test_registered_source_is_the_logged_models_location_whatever_the_global_uri(
        models: LocalBackend, home: LocalHome, runs: dict[str, str], tmp_path: Path) -> None:
    """The source rule both backends share (``hubml.registry``), from a process whose own MLflow URI is elsewhere.

    ``models:/<model_id>`` would be resolved by MLflow's SQL store through the
    process-global tracking URI, not the backend's store.
    """
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'elsewhere.db'}")
    try:
        info = models.register_model(RegisterRequest(name="iris-source", run_id=runs["v1"]).validate())
    finally:
        mlflow.set_tracking_uri(None)
    client = MlflowClient(home.tracking_uri)
    run = client.get_run(runs["v1"])
    [logged] = [m for m in client.search_logged_models(experiment_ids=[run.info.experiment_id])
                if m.source_run_id == runs["v1"]]
    version = client.get_model_version("iris-source", str(info.version))
    assert info.source == version.source == logged.artifact_location
    links = json.loads(client.get_logged_model(logged.model_id).tags["mlflow.modelVersions"])
    assert [str(v["version"]) for v in links if v["name"] == version.name] == [str(version.version)]
    client.delete_registered_model("iris-source")


def test_register_other_artifact_path_and_refusals_leave_nothing(models: LocalBackend, runs: dict[str, str]) -> None:
    info = models.register_model(RegisterRequest(name="iris-other", run_id=runs["other_path"],
                                                 artifact_path="clf").validate())
    assert (info.name, info.version) == ("iris-other", 1)
    before = {m.name: [v.version for v in m.versions] for m in models.models()}
    with pytest.raises(NotFound, match="no logged model at all"):
        models.register_model(RegisterRequest(name="iris-bare", run_id=runs["bare"]).validate())
    with pytest.raises(NotFound, match="pass --artifact-path clf"):
        models.register_model(RegisterRequest(name="iris-other", run_id=runs["other_path"]).validate())
    with pytest.raises(NotFound, match="does not exist"):
        models.register_model(RegisterRequest(name="iris-x", run_id="0" * 32).validate())
    after = {m.name: [v.version for v in m.versions] for m in models.models()}
    assert after == before  # no model, no version was created by a refused registration


def test_deploy_answers_http_and_predict_formats(models: LocalBackend, home: LocalHome, no_servers_left) -> None:
    info = models.deploy(DeploySpec(model=ModelRef.parse("iris-clf@champion"), name="iris-clf"))
    try:
        assert info.state == "ready" and info.version == 1 and info.url.endswith("/invocations")
        # The real MLflow scoring protocol, spoken by hand: split-oriented frame.
        raw = _post(info.url, {"dataframe_split": {"columns": ["a", "b", "c", "d"], "data": [SETOSA]}})
        assert raw == {"predictions": [0]}
        import numpy as np
        import pandas as pd

        assert models.predict("iris-clf", [SETOSA, [6.7, 3.0, 5.2, 2.3]]) == [0, 2]
        assert models.predict("iris-clf", np.array([SETOSA])) == [0]
        frame = pd.DataFrame([SETOSA], columns=["sl", "sw", "pl", "pw"])
        assert models.predict("iris-clf", frame) == [0]
        assert models.predict("iris-clf", {"sl": [5.1], "sw": [3.5], "pl": [1.4], "pw": [0.2]}) == [0]
        with pytest.raises(InvalidRequest, match="refused the data"):
            models.predict("iris-clf", [[1.0, 2.0]])  # two features for a four-feature model: HTTP 400
        [listed] = models.deployments()
        assert (listed.name, listed.state, listed.version) == ("iris-clf", "ready", 1)
    finally:
        models.undeploy("iris-clf")
    assert not psutil.pid_exists(info.pid) or psutil.Process(info.pid).status() == psutil.STATUS_ZOMBIE
    assert models.deployments() == []
    with pytest.raises(NotFound, match="No deployment named 'iris-clf'"):
        models.undeploy("iris-clf")


def test_redeploy_same_name_keeps_answering(models: LocalBackend, no_servers_left) -> None:
    first = models.deploy(DeploySpec(model=ModelRef.parse("iris-clf@champion"), name="live"))
    seen: list[object] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                seen.append(models.predict("live", [SETOSA])[0])
            except BaseException as e:  # noqa: BLE001 - every failure counts as downtime
                errors.append(e)

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        second = models.deploy(DeploySpec(model=ModelRef.parse("iris-clf/2"), name="live"))
        deadline = time.monotonic() + 30
        while (not seen or seen[-1] != 1) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(timeout=60)
    try:
        assert errors == [], f"predictions failed during the redeploy: {errors[:3]}"
        assert 0 in seen and 1 in seen, "the answers never switched from version 1 to version 2"
        assert seen.index(1) > 0 and 0 not in seen[seen.index(1):], "answers went back to the old version"
        assert second.version == 2 and second.url != first.url and "replaced" in second.message
        assert not _running(first.pid), "the old server still runs after the switch"
        assert [d.version for d in models.deployments()] == [2]
    finally:
        models.undeploy("live")


def _running(pid: int | None) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_dead_deployment_is_reported_and_can_be_removed(models: LocalBackend, no_servers_left) -> None:
    info = models.deploy(DeploySpec(model=ModelRef.parse("iris-clf/1"), name="doomed"))
    tree = [psutil.Process(info.pid), *psutil.Process(info.pid).children(recursive=True)]
    for proc in tree:  # frozen: the process exists but answers nothing
        proc.send_signal(signal.SIGSTOP)
    [listed] = models.deployments()
    assert listed.state == "unresponsive" and f"process {info.pid} runs but does not answer" in listed.message
    for proc in tree:
        proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(tree, timeout=10)
    [listed] = models.deployments()
    assert listed.state == "dead" and "%undeploy doomed" in listed.message
    with pytest.raises(BackendError) as err:
        models.predict("doomed", [SETOSA])
    assert "is dead" in err.value.message and "%deploy iris-clf/1 --name doomed" in err.value.next_step
    models.undeploy("doomed")
    assert models.deployments() == []


def test_busy_port_refused_and_port_race_retried(models: LocalBackend, home: LocalHome, monkeypatch,
                                                 no_servers_left) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(Conflict, match=f"Port {port} on 127.0.0.1 is already in use"):
            models.deploy(DeploySpec(model=ModelRef.parse("iris-clf"), name="clash", port=port))
        assert models.deployments() == []
        # The race: the port looked free when picked but is taken when the server binds.
        # The server fails with "address already in use" and deploy retries on a fresh port.
        real_free_port = model_server.free_port
        handed = []

        def racy_free_port(avoid=frozenset()):
            handed.append(port if not handed else real_free_port(avoid))
            return handed[-1]

        monkeypatch.setattr(model_server, "free_port", racy_free_port)
        info = models.deploy(DeploySpec(model=ModelRef.parse("iris-clf"), name="race"))
    try:
        assert handed[0] == port and len(handed) == 2
        assert f":{port}/" not in info.url
        assert models.predict("race", [SETOSA]) == [1]
    finally:
        models.undeploy("race")


def test_redeploy_on_the_same_port_says_why_not(models: LocalBackend, no_servers_left) -> None:
    port = model_server.free_port()
    first = models.deploy(DeploySpec(model=ModelRef.parse("iris-clf/1"), name="pinned", port=port))
    try:
        assert first.url == f"http://127.0.0.1:{port}/invocations"
        with pytest.raises(Conflict, match="without downtime needs a second port"):
            models.deploy(DeploySpec(model=ModelRef.parse("iris-clf/2"), name="pinned", port=port))
        assert models.predict("pinned", [SETOSA]) == [0]  # the running one was not touched
        with pytest.raises(Conflict, match="used by deployment 'pinned'"):
            models.deploy(DeploySpec(model=ModelRef.parse("iris-clf/2"), name="other", port=port))
    finally:
        models.undeploy("pinned")


def test_against_a_real_tracking_server(mlflow_server, tmp_path: Path) -> None:
    """Registry and serving through ``mlflow server`` over HTTP (artifacts proxied by the server)."""
    runs = log_runs(mlflow_server.url, {"srv": {"artifact_path": "model", "shift": 2}}, cwd=str(tmp_path))
    home = LocalHome(root=tmp_path / "home", tracking_uri=mlflow_server.url)
    backend = LocalBackend(home)
    name = f"srv-{os.getpid()}-{int(time.time())}"
    info = backend.register_model(RegisterRequest(name=name, run_id=runs["srv"], alias="prod").validate())
    assert info.version == 1
    assert any(m.name == name and m.aliases == {"prod": 1} for m in backend.models())
    dep = backend.deploy(DeploySpec(model=ModelRef.parse(f"{name}@prod"), name="srv"))
    try:
        assert backend.predict("srv", [SETOSA]) == [2]
    finally:
        backend.undeploy("srv")
    assert not wait_no_processes(home.root, timeout=15)
    assert not _running(dep.pid)


def test_server_that_does_not_answer_in_time_is_stopped(models: LocalBackend, home: LocalHome, no_servers_left) -> None:
    with pytest.raises(BackendError) as err:
        models.deploy(DeploySpec(model=ModelRef.parse("iris-clf"), name="slow"), wait=0.5)
    assert "did not answer within 0.5 s and was stopped" in err.value.message
    assert "--timeout" in err.value.next_step
    assert models.deployments() == []
