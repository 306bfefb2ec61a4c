"""Expansion of the compact GPU catalogue into KubeSpawner ``profile_list`` entries (pure).

One :class:`hubml.profiles.Profile` becomes one KubeSpawner profile dict whose
``kubespawner_override`` sets exactly what the pod needs:

- ``extra_resource_guarantees`` == ``extra_resource_limits`` == the extended
  resource (``nvidia.com/gpu``, ``nvidia.com/mig-1g.10gb``…): the device plugin
  requires requests equal to limits for extended resources;
- ``node_selector`` (dict, merged by KubeSpawner) and ``node_affinity_required``
  (the GFD product label), ``tolerations`` (the GPU taint) — both list settings are
  *extended*, not replaced, by :mod:`hubml.spawner.merges` at load time;
- ``extra_labels`` / ``extra_annotations``: ``hubml.io/profile`` & co;
- ``cpu_guarantee``/``cpu_limit``/``mem_guarantee``/``mem_limit``;
- image choices as ``profile_options["image"]`` (and an ``unlisted_choice`` with an
  anchored ``validation_regex`` when ``custom_image`` is set).

The dicts carry ``hubml_profile`` (the catalogue name) so the spawner can find the
:class:`Profile` again from a slug.
"""

from __future__ import annotations

from typing import Any

from hubml.profiles import Catalogue, Profile

#: KubeSpawner's option name for image choices.
IMAGE_OPTION = "image"


def profile_override(profile: Profile) -> dict[str, Any]:
    """The ``kubespawner_override`` for one profile (profile's own overrides last)."""
    o: dict[str, Any] = {}
    res = {k: str(v) for k, v in profile.resources().items()}
    if res:
        o["extra_resource_guarantees"] = dict(res)
        o["extra_resource_limits"] = dict(res)
    if profile.cpu is not None:
        o["cpu_guarantee"] = profile.cpu
        o["cpu_limit"] = profile.cpu_limit if profile.cpu_limit is not None else profile.cpu
    elif profile.cpu_limit is not None:
        o["cpu_limit"] = profile.cpu_limit
    if profile.memory_bytes is not None:
        o["mem_guarantee"] = profile.memory_bytes
        o["mem_limit"] = profile.memory_limit_bytes or profile.memory_bytes
    elif profile.memory_limit_bytes is not None:
        o["mem_limit"] = profile.memory_limit_bytes
    sel = profile.node_selector()
    if sel:
        o["node_selector"] = sel
    aff = profile.node_affinity()
    if aff:
        o["node_affinity_required"] = [{"matchExpressions": aff}]
    tol = profile.tolerations()
    if tol:
        o["tolerations"] = tol
    o["extra_labels"] = profile.pod_labels()
    o["extra_annotations"] = profile.pod_annotations()
    for k, v in profile.kubespawner_override.items():
        o[k] = v
    return o


def image_option(profile: Profile) -> dict[str, Any] | None:
    """KubeSpawner ``profile_options`` entry for the profile's image choices."""
    if not profile.images and not profile.custom_image:
        return None
    choices = {}
    has_default = any(c.default for c in profile.images)
    for i, c in enumerate(profile.images):
        choices[c.name] = {
            "display_name": c.display,
            "default": c.default or (not has_default and i == 0),
            "kubespawner_override": {"image": c.image},
        }
    opt: dict[str, Any] = {"display_name": "Image", "choices": choices}
    if profile.custom_image:
        ci = profile.custom_image
        opt["unlisted_choice"] = {
            "enabled": True,
            "display_name": ci.display,
            "display_name_in_choices": ci.display,
            "validation_regex": ci.validation_regex,
            "validation_message": ci.message,
            "kubespawner_override": {"image": "{value}"},
        }
    return opt


def expand_profile(profile: Profile) -> dict[str, Any]:
    """One KubeSpawner profile dict."""
    entry: dict[str, Any] = {
        "display_name": profile.display,
        "slug": profile.name,
        "description": profile.description,
        "default": profile.default,
        "kubespawner_override": profile_override(profile),
        "hubml_profile": profile.name,
    }
    opt = image_option(profile)
    if opt:
        entry["profile_options"] = {IMAGE_OPTION: opt}
    return entry


def expand_catalogue(catalogue: Catalogue) -> list[dict[str, Any]]:
    """KubeSpawner profile dicts for the whole catalogue, in order."""
    return [expand_profile(p) for p in catalogue]
