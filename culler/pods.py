"""Which Kubernetes pod a hub server runs in, without asking the hub for state.

The culler matches GPU metrics to servers by pod name. Reading the spawner
state would need the broad ``admin:server_state`` scope, so instead we expand
the same ``pod_name_template`` KubeSpawner uses, with KubeSpawner's own "safe"
slug functions (kubespawner 7 default scheme).
"""

from __future__ import annotations

from kubespawner.slugs import multi_slug, safe_slug

_SLUG_MAX = 48  # kubespawner's per-field budget


def pod_name(template: str, username: str, servername: str) -> str:
    """Expand ``template`` ({username}, {servername}, {user_server}) like KubeSpawner."""
    safe_user = safe_slug(username, max_length=_SLUG_MAX)
    safe_server = safe_slug(servername, max_length=_SLUG_MAX) if servername else ""
    if len(safe_user) + len(safe_server) + 2 > _SLUG_MAX:
        user_server = multi_slug([username, servername], max_length=_SLUG_MAX)
    elif servername:
        user_server = f"{safe_user}--{safe_server}"
    else:
        user_server = safe_user
    return template.format(username=safe_user, servername=safe_server, user_server=user_server)
