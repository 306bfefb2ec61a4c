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
- ``cpu_guarantee``/``cpu_limit``/``mem_guarantee``/``mem_limit`` and, for CPU
  profiles, ``environment: {NVIDIA_VISIBLE_DEVICES: void}`` (one rule with the
  hub service's pods: :mod:`hubml.pod_resources`);
- image choices as ``profile_options["image"]`` (and an ``unlisted_choice`` with an
  anchored ``validation_regex`` when ``custom_image`` is set).

The dicts carry ``hubml_profile`` (the catalogue name) so the spawner can find the
:class:`Profile` again from a slug.
"""

from __future__ import annotations

from typing import Any

from hubml.pod_resources import pod_resources
from hubml.profiles import Catalogue, Profile

#: KubeSpawner's option name for image choices.
IMAGE_OPTION = "image"


def profile_override(profile: Profile) -> dict[str, Any]:
    """The ``kubespawner_override`` for one profile (profile's own overrides last).

    Resources come from :func:`hubml.pod_resources.pod_resources`, the rule the hub
    service's pods follow too. ``environment`` is a dict trait, which KubeSpawner
    merges into the base configuration, so ``NVIDIA_VISIBLE_DEVICES=void`` for a
    CPU profile adds to the admin's environment; a profile's own ``environment``
    override is merged over it rather than replacing it.
    """
    o: dict[str, Any] = {}
    res = pod_resources(profile)
    if res.extended:
        o["extra_resource_guarantees"] = {k: str(v) for k, v in res.extended.items()}
        o["extra_resource_limits"] = {k: str(v) for k, v in res.extended.items()}
    if res.cpu_request is not None:
        o["cpu_guarantee"] = res.cpu_request
    if res.cpu_limit is not None:
        o["cpu_limit"] = res.cpu_limit
    if res.memory_request is not None:
        o["mem_guarantee"] = res.memory_request
    if res.memory_limit is not None:
        o["mem_limit"] = res.memory_limit
    if res.env:
        o["environment"] = dict(res.env)
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
        if k == "environment" and isinstance(v, dict) and k in o:
            v = {**o[k], **v}
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
