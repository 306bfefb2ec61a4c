"""Configuration defaults of the culler that depend on where it runs."""

from __future__ import annotations

import pytest

from hubml.culler import app as culler_app


def _namespace(monkeypatch, tmp_path, *, env: str | None, sa: str | None) -> str:
    if env is None:
        monkeypatch.delenv("POD_NAMESPACE", raising=False)
    else:
        monkeypatch.setenv("POD_NAMESPACE", env)
    path = tmp_path / "namespace"
    if sa is not None:
        path.write_text(sa)
    monkeypatch.setattr(culler_app, "SERVICE_ACCOUNT_NAMESPACE", str(path))
    return culler_app.CullerApp().namespace


@pytest.mark.parametrize(
    "env, sa, expected",
    [
        ("team-a", "hub-ns\n", "team-a"),  # the environment wins
        (None, "hub-ns\n", "hub-ns"),  # a hub-managed service: the hub pod's service account
        (None, "", "default"),  # an empty file is no answer
        (None, None, "default"),  # outside Kubernetes
    ],
)
def test_namespace_default(monkeypatch, tmp_path, env, sa, expected):
    assert _namespace(monkeypatch, tmp_path, env=env, sa=sa) == expected


def test_namespace_explicit_setting_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("POD_NAMESPACE", "team-a")
    monkeypatch.setattr(culler_app, "SERVICE_ACCOUNT_NAMESPACE", str(tmp_path / "missing"))
    app = culler_app.CullerApp()
    app.initialize(["--namespace=gpu-users"])
    assert app.namespace == "gpu-users"
