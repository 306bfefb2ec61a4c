"""Make this folder's helper modules (culler_env, fault_proxy) importable under --import-mode=importlib;
the culler tests' shared fixtures."""

import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from culler_env import start_env  # noqa: E402


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    """One hub for the whole bad-input corpus, with an idle server to protect."""
    from hubml_testing.jupyterhub import start_hub

    class Factory:
        hubs: list = []

        def __call__(self, **kw):
            hub = start_hub(tmp_path_factory.mktemp("cli-hub"), **kw)
            self.hubs.append(hub)
            return hub

    factory = Factory()
    env = start_env(factory, tmp_path_factory.mktemp("cli-fleet"))
    env.hub.start_server("alice")
    time.sleep(1.2)
    yield env
    for hub in factory.hubs:
        hub.stop()
