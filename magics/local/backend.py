"""``LocalBackend``: the local mixins (training, registry, deployments) put together on one ``LocalHome``."""

from __future__ import annotations

from hubml.magics.backend import Backend
from hubml.magics.local.home import LocalHome
from hubml.magics.local.deployments import LocalDeployments
from hubml.magics.local.registry import LocalRegistry
from hubml.magics.local.training import LocalTraining


class LocalBackend(LocalTraining, LocalRegistry, LocalDeployments, Backend):
    """The mixins read ``self.home`` (deployments also ``self.registry``); none defines ``__init__``."""

    name = "local"

    def __init__(self, home: LocalHome | None = None) -> None:
        self.home = home or LocalHome.from_env()
