"""The IPython extension: ``%load_ext hubml``.

Magics are grouped by what they act on — ``train.py`` (``%%train``, ``%jobs``,
``%train_status``, ``%train_logs``, ``%train_cancel``) and ``models.py``
(``%register_model``, ``%models``, ``%deploy``, ``%deployments``,
``%undeploy``, ``%predict``) — and reach work only through a ``Backend``
(``backend.py``) chosen per session (``session.py``).
"""

from __future__ import annotations

from typing import Any


def load_ipython_extension(ipython: Any) -> None:
    from hubml.magics.models import ModelMagics
    from hubml.magics.train import TrainMagics

    ipython.register_magics(TrainMagics)
    ipython.register_magics(ModelMagics)


def unload_ipython_extension(ipython: Any) -> None:
    """IPython has no public unregister; magics stay until the kernel restarts."""
