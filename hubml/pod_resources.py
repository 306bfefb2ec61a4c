"""What a profile asks of the node for one pod: CPU, memory, GPUs, and the GPU isolation env (pure).

The one rule both pod builders follow — the spawner (single-user servers, through
KubeSpawner's traits) and the hub service (training workers and model servers,
as container ``resources``) — so a profile means the same pod wherever it runs:

- CPU and memory: the profile's value is the request; the limit is the profile's
  ``*_limit`` or, without one, the request (a Guaranteed-like pod by default);
- GPUs (full, MIG slice or time-sliced share): an extended resource with
  requests == limits, as the device plugin requires;
- no GPU: ``NVIDIA_VISIBLE_DEVICES=void``.  With no GPU limit the NVIDIA container
  runtime exposes *every* device of the node to a pod whose image sets
  ``NVIDIA_VISIBLE_DEVICES=all`` (as the CUDA and Jupyter images do), so a CPU
  profile landing on a GPU node would see and could use GPUs it was never given;
  the device plugin's README warns of exactly this, and the NVIDIA container
  toolkit documents ``void`` as "no GPU, behave like runc".
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hubml.profiles import Profile
from hubml.quantities import cpu_quantity

#: What non-GPU pods get so the NVIDIA runtime hides the node's devices from them.
NO_GPU_ENV = {"NVIDIA_VISIBLE_DEVICES": "void"}

__all__ = ["NO_GPU_ENV", "PodResources", "pod_resources"]


@dataclass(frozen=True)
class PodResources:
    """Requests, limits and the env that goes with them, in the profile's own units."""

    cpu_request: float | None = None
    cpu_limit: float | None = None
    memory_request: int | None = None
    memory_limit: int | None = None
    #: extended resources (``nvidia.com/gpu``, ``nvidia.com/mig-1g.10gb``): requests == limits
    extended: dict[str, int] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    def kubernetes(self) -> dict[str, dict[str, str]]:
        """A container's ``resources`` (only the parts that are set)."""
        requests: dict[str, str] = {}
        limits: dict[str, str] = {}
        if self.cpu_request is not None:
            requests["cpu"] = cpu_quantity(self.cpu_request)
        if self.cpu_limit is not None:
            limits["cpu"] = cpu_quantity(self.cpu_limit)
        if self.memory_request is not None:
            requests["memory"] = str(self.memory_request)
        if self.memory_limit is not None:
            limits["memory"] = str(self.memory_limit)
        for name, count in self.extended.items():
            requests[name] = limits[name] = str(count)
        return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}


def pod_resources(profile: Profile | None, gpus: int | None = None) -> PodResources:
    """The resources of one pod of ``profile`` (None: the hub's default, no profile).

    ``gpus`` is how many of the profile's GPU resource the pod takes (a training
    worker may take fewer than the profile holds); None means the profile's count.
    """
    if profile is None:
        return PodResources(env=dict(NO_GPU_ENV))
    count = profile.gpu.count if gpus is None and profile.gpu else (gpus or 0)
    extended = {profile.gpu.resource: count} if profile.gpu and count else {}
    cpu_limit = profile.cpu_limit if profile.cpu_limit is not None else profile.cpu
    mem_limit = profile.memory_limit_bytes if profile.memory_limit_bytes is not None else profile.memory_bytes
    return PodResources(
        cpu_request=profile.cpu,
        cpu_limit=cpu_limit,
        memory_request=profile.memory_bytes,
        memory_limit=mem_limit,
        extended=extended,
        env={} if extended else dict(NO_GPU_ENV),
    )
