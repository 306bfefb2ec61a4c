"""The spawn form: profiles with "N free of M", the hourly cost, full ones disabled.

``form_entries`` is pure (profile dicts + availability + the user's groups ->
view model); ``render_form`` fills ``gpu_form.html`` (next to this module) with a Jinja
environment compiled once per process (stock KubeSpawner builds a new
Environment and recompiles its template on every render).  Field names are
KubeSpawner's (``profile``, ``profile-option-<slug>--<option>``), so its
``options_from_form`` parses the submission unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape

from hubml.availability import Availability
from hubml.profiles import Catalogue


@dataclass
class FormEntry:
    slug: str
    display_name: str
    description: str
    profile_options: dict = field(default_factory=dict)
    gpu: str = ""
    cost: str = ""
    availability: str = ""
    disabled: bool = False
    reason: str = ""
    checked: bool = False
    restricted: bool = False


def form_entries(
    profile_list: list[dict[str, Any]],
    catalogue: Catalogue,
    availability: Mapping[str, Availability],
    user_groups: Iterable[str],
    selected: str | None = None,
    show_restricted: bool = False,
) -> list[FormEntry]:
    """View model of the form.  Profiles reserved for other groups are left out
    (or shown disabled with ``show_restricted``); full ones are disabled."""
    groups = set(user_groups)
    out: list[FormEntry] = []
    for p in profile_list:
        name = p.get("hubml_profile")
        prof = catalogue.get(name) if name in catalogue else None
        e = FormEntry(
            slug=p["slug"],
            display_name=p.get("display_name", p["slug"]),
            description=p.get("description", ""),
            profile_options=p.get("profile_options") or {},
        )
        if prof is not None:
            if not prof.allowed_for(groups):
                if not show_restricted:
                    continue
                e.disabled, e.restricted = True, True
                e.reason = f"reserved for {', '.join(prof.groups)}"
            e.gpu = prof.describe_gpu() if prof.gpu else ""
            if prof.hourly_cost is not None:
                e.cost = f"${prof.hourly_cost:.2f}/h"
            a = availability.get(prof.name)
            if a is not None:
                e.availability = f"{a.free} free of {a.total}"
                if a.full and not e.disabled:
                    e.disabled = True
                    e.reason = "full right now" if a.total else "no matching node in the cluster"
        out.append(e)
    enabled = [e for e in out if not e.disabled]
    pick = next((e for e in enabled if e.slug == selected), None)
    if pick is None:
        defaults = {p["slug"] for p in profile_list if p.get("default")}
        pick = next((e for e in enabled if e.slug in defaults), enabled[0] if enabled else None)
    if pick is not None:
        pick.checked = True
    return out


@lru_cache(maxsize=1)
def _template():
    env = Environment(
        loader=FileSystemLoader(os.path.dirname(os.path.abspath(__file__))),
        autoescape=select_autoescape(["html"]),
    )
    return env.get_template("gpu_form.html")


def render_form(entries: list[FormEntry]) -> str:
    """HTML of the form (a fragment JupyterHub puts inside its spawn page)."""
    return _template().render(entries=entries, any_enabled=any(not e.disabled for e in entries))
