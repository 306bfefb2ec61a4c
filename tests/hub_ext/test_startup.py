"""The service refuses bad configuration at startup with the reason, and the notebook side finds it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hubml import scoring
from hubml.magics import hub


def _start(tmp_path, config: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cfg = tmp_path / "cfg.py"
    cfg.write_text("c = get_config()  # noqa\n" + config)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "MLFLOW_"))}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "hubml.hub_ext", f"--config={cfg}"], capture_output=True,
                          text=True, timeout=120, env=full_env, cwd=tmp_path)


GOOD = "c.HubMLService.mlflow_tracking_uri = 'http://127.0.0.1:9'\n"


@pytest.mark.parametrize("config, env, fragment", [
    ("c.HubMLService.profiles = [{'name': 'a100', 'gpu': {'model': 'A100-SXM4-80GB', 'mig': '1g.5gb'}}]\n" + GOOD,
     {"JUPYTERHUB_API_TOKEN": "x"}, "does not exist on A100-SXM4-80GB"),
    ("c.HubMLService.allowed_images = ['quay.io/.*']\n" + GOOD, {"JUPYTERHUB_API_TOKEN": "x"}, "must start with '^'"),
    ("c.HubMLService.namespace = 'Bad_NS'\n" + GOOD, {"JUPYTERHUB_API_TOKEN": "x"}, "not a valid name"),
    ("", {"JUPYTERHUB_API_TOKEN": "x"}, "mlflow_tracking_uri is empty"),
    (GOOD, {}, "No JupyterHub API token"),
    (GOOD + "c.HubMLService.kubeconfig = '/nonexistent/kubeconfig'\n", {"JUPYTERHUB_API_TOKEN": "x"},
     "cannot load Kubernetes credentials"),
])
def test_bad_configuration_stops_the_service(tmp_path, config, env, fragment):
    result = _start(tmp_path, config, env)
    assert result.returncode != 0
    assert fragment in result.stdout + result.stderr, result.stdout + result.stderr


def test_service_url_from_the_hub_environment(monkeypatch):
    monkeypatch.delenv("HUBML_SERVICE_URL", raising=False)
    monkeypatch.setenv("JUPYTERHUB_API_URL", "http://hub.example:8000/prefix/hub/api")
    assert hub.service_url() == "http://hub.example:8000/prefix/services/hubml/"
    monkeypatch.setenv("HUBML_SERVICE_URL", "http://proxy-public/services/hubml")
    assert hub.service_url() == "http://proxy-public/services/hubml/"
    monkeypatch.delenv("JUPYTERHUB_API_TOKEN", raising=False)
    assert hub.service_reachable() is False


def test_v2_inference_request_from_rows():
    body = scoring.v2_request({"inputs": [[1.0, 2.0], [3.0, 4.0]]})
    assert body == {"parameters": {"content_type": "np"},
                    "inputs": [{"name": "input-0", "shape": [2, 2], "datatype": "FP64", "data": [1.0, 2.0, 3.0, 4.0]}]}
