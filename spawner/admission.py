"""Decisions taken when a server is asked for (pure: no I/O, no JupyterHub objects).

Each function returns ``None`` when the spawn may go on, or a
:class:`Refusal` carrying the HTTP status and the one-paragraph message the
user sees (on the spawn page, or as the REST API error body).  The spawner turns
a Refusal into ``tornado.web.HTTPError`` *before* any Kubernetes object exists,
so a refused spawn changes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from hubml.availability import Availability
from hubml.profiles import Catalogue, Profile


@dataclass(frozen=True)
class Refusal:
    status: int
    message: str


UNLISTED = "--unlisted-choice"


def check_user_options(profile_list: list[dict[str, Any]], user_options: Any) -> Refusal | dict[str, Any]:
    """Validate ``user_options`` (form or REST API) against an initialized profile list.

    Returns the selected profile dict, or a 400 Refusal naming the bad key/value.
    Unlike stock KubeSpawner, an unknown choice is refused here instead of raising
    ``KeyError`` deep inside ``_load_profile``, and unknown keys are refused rather
    than silently ignored, so a typo in an API call is noticed.
    """
    if user_options is None:
        user_options = {}
    if not isinstance(user_options, Mapping):
        return Refusal(400, f"Server options must be a JSON object, got {type(user_options).__name__}.")
    if not profile_list:
        if user_options.get("profile"):
            return Refusal(400, "This hub has no profiles; start the server without a 'profile' option.")
        return {}
    slugs = [p["slug"] for p in profile_list]
    slug = user_options.get("profile")
    if slug in (None, ""):
        profile = next((p for p in profile_list if p.get("default")), profile_list[0])
    elif not isinstance(slug, str) or slug not in slugs:
        return Refusal(400, f"Unknown profile {slug!r}. Choose one of: {', '.join(slugs)}.")
    else:
        profile = next(p for p in profile_list if p["slug"] == slug)

    options = profile.get("profile_options") or {}
    allowed = {"profile"} | set(options) | {f"{k}{UNLISTED}" for k in options}
    unknown = sorted(str(k) for k in user_options if k not in allowed)
    if unknown:
        hint = f" Profile {profile['slug']!r} takes: {', '.join(sorted(allowed))}."
        return Refusal(400, f"Unknown server option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}.{hint}")
    for name, opt in options.items():
        choice = user_options.get(name)
        unlisted = user_options.get(f"{name}{UNLISTED}")
        if choice is not None and choice != "" and unlisted:
            return Refusal(400, f"Give either {name!r} or {name + UNLISTED!r}, not both.")
        if unlisted not in (None, ""):
            uc = opt.get("unlisted_choice") or {}
            if not uc.get("enabled"):
                return Refusal(400, f"Option {name!r} of profile {profile['slug']!r} takes only: {', '.join(opt.get('choices') or {})}.")
            if not isinstance(unlisted, str) or len(unlisted) > 512:
                return Refusal(400, f"Option {name + UNLISTED!r} must be a string of at most 512 characters.")
            rx = uc.get("validation_regex")
            if rx and not re.fullmatch(rx, unlisted):
                msg = uc.get("validation_message") or f"it must match {rx}"
                return Refusal(400, f"{unlisted!r} is not allowed for {name!r}: {msg}.")
        elif choice not in (None, ""):
            choices = opt.get("choices") or {}
            if not isinstance(choice, str) or choice not in choices:
                return Refusal(
                    400,
                    f"Unknown choice {choice!r} for option {name!r} of profile {profile['slug']!r}. "
                    f"Choose one of: {', '.join(choices)}.",
                )
    return profile


def check_groups(profile: Profile, user_groups: Iterable[str]) -> Refusal | None:
    if profile.allowed_for(user_groups):
        return None
    return Refusal(
        403,
        f"Profile {profile.name!r} ({profile.display}) is reserved for the group"
        f"{'s' if len(profile.groups) > 1 else ''} {', '.join(profile.groups)}; "
        "ask a hub admin to add you, or choose another profile.",
    )


def check_user_gpu_limit(
    profile: Profile, catalogue: Catalogue, other_servers: Iterable[tuple[str, str | None]], max_gpus: int | None
) -> Refusal | None:
    """``other_servers`` = (server name, profile name) of the user's other active servers."""
    if not max_gpus or not profile.gpu_units:
        return None
    used = []
    for server, pname in other_servers:
        if pname in catalogue:
            units = catalogue.get(pname).gpu_units
            if units:
                used.append((server or "default server", pname, units))
    total = sum(u for _, _, u in used)
    if total + profile.gpu_units <= max_gpus:
        return None
    running = "; ".join(f"{s} uses {u} ({p})" for s, p, u in used) or "none"
    return Refusal(
        403,
        f"Starting {profile.name!r} would give you {total + profile.gpu_units} GPUs, above the limit of "
        f"{max_gpus} per user (your other servers: {running}). Stop one of them first.",
    )


def check_availability(
    profile: Profile, avail: Availability | None, catalogue: Catalogue, all_avail: Mapping[str, Availability],
    user_groups: Iterable[str] = (),
) -> Refusal | None:
    """A full profile is refused at once, naming alternatives that have room."""
    if avail is None or not avail.full:
        return None
    groups = set(user_groups)
    alts = [
        f"{name} has {a.free} free"
        for name, a in all_avail.items()
        if name != profile.name and not a.full and catalogue.get(name).allowed_for(groups)
    ]
    what = profile.describe_gpu()
    need = f" ({profile.gpu.count} needed on one node)" if profile.gpu.count > 1 and avail.free else ""
    tail = f"; {', '.join(alts)}" if alts else "; no other GPU profile has room either, try again later"
    if not avail.nodes:  # "0 of 0" would read as a cluster without such GPUs
        return Refusal(409, f"no {what} free: no node offering it is Ready and open to this profile right now "
                            f"(NotReady, cordoned, or tainted against it){tail}.")
    return Refusal(409, f"no {what} free: {avail.free} of {avail.total}{need}{tail}.")


_INSUFFICIENT_RE = re.compile(r"Insufficient ([A-Za-z0-9./_-]+)")


def translate_failed_scheduling(message: str, profile: Profile | None, avail: Availability | None = None) -> str | None:
    """Turn a ``FailedScheduling`` event into a sentence, or None if it is not about GPUs.

    kube-scheduler writes e.g. ``0/9 nodes are available: 2 Insufficient nvidia.com/gpu,
    7 node(s) didn't match Pod's node affinity/selector. preemption: …``.
    """
    missing = sorted({m for m in _INSUFFICIENT_RE.findall(message) if "/" in m})
    if not missing:
        return None
    what = profile.describe_gpu() if profile and profile.gpu else ", ".join(missing)
    count = f" {avail.free} of {avail.total} free" if avail else ""
    return (
        f"The cluster has no room for this server: not enough {', '.join(missing)} for {what}"
        f"{' (' + count.strip() + ')' if count else ''}. Someone took the last one while your server was "
        f"starting; choose another profile or try again later. (scheduler: {message.strip()})"
    )
