"""hubml's JupyterHub spawner: ``c.JupyterHub.spawner_class = "hubml"``.

See :mod:`hubml.spawner.spawner` for the class and the README's 'GPU profiles (HubMLSpawner)' reference for the
admin's tour.  Importing this module inside a starting JupyterHub validates
``c.HubMLSpawner.gpu_profiles`` right away, so a misconfigured hub refuses to
start (one line per problem) instead of failing at the first spawn.
"""

from .spawner import HubMLSpawner, check_gpu_profiles
from .startup import check_running_hub_config

__all__ = ["HubMLSpawner", "check_gpu_profiles", "check_running_hub_config"]

check_running_hub_config()
