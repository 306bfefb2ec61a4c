"""hubml.culler: GPU-aware idle culler for JupyterHub.

``policy`` holds the pure cull decisions; ``hub``, ``gpu``, ``notify`` and
``metrics`` the I/O edges; ``cycle`` one pass; ``app`` the service
(``python -m hubml.culler``).
"""

from .policy import Action, Decision, PolicyConfig, ProfilePolicy, ServerSnapshot, decide

__all__ = ["Action", "Decision", "PolicyConfig", "ProfilePolicy", "ServerSnapshot", "decide"]
