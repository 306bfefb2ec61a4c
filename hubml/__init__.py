"""hubml: JupyterHub on Kubernetes made for ML teams.

One import namespace for every part: ``hubml.spawner`` (GPU profiles spawner),
``hubml.culler`` (GPU-aware idle culler), ``hubml.hub_ext`` (the hub service the
magics talk to), ``hubml.magics`` (the IPython extension). The top-level package
holds only the domain model they share, so importing ``hubml`` stays cheap: the
extension hook imports the magics (and their heavy dependencies) lazily.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext hubml``: register the training, model and serving magics."""
    from hubml.magics import load_ipython_extension as _load

    _load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from hubml.magics import unload_ipython_extension as _unload

    _unload(ipython)


#: ``hubml.predict(...)`` etc.: the most used calls of ``hubml.magics.api``,
#: imported on first use so ``import hubml`` stays cheap (no MLflow import).
_API = ("predict", "deploy", "register_model", "deployments", "undeploy", "models")


def __getattr__(name: str) -> Any:
    if name in _API:
        from hubml.magics import api

        return getattr(api, name)
    raise AttributeError(f"module 'hubml' has no attribute {name!r}")
