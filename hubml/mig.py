"""The MIG catalogue: which Multi-Instance GPU profiles exist on which GPU model.

Why a table in code: a profile such as ``{"model": "A100-SXM4-80GB", "mig": "1g.5gb"}``
names a slice that does not exist on that card (``1g.5gb`` is an A100 *40GB* slice).
Kubernetes would accept the pod and leave it Pending forever, because no node will
ever advertise ``nvidia.com/mig-1g.5gb`` with that product label.  We refuse such a
profile when the hub starts instead.

Source: NVIDIA Multi-Instance GPU User Guide, "Supported MIG Profiles"
(https://docs.nvidia.com/datacenter/tesla/mig-user-guide/supported-mig-profiles.html).
``instances`` is the "Number of Instances Available" column: how many slices of
that profile one physical GPU holds when it is partitioned homogeneously.

Public API (pure, no I/O):

- ``MIG_CATALOGUE``: ``{family: MigFamily}``
- ``family_for_model(model) -> MigFamily | None``: resolves a GPU Feature Discovery
  product label (``A100-SXM4-80GB``, ``NVIDIA-A100-SXM4-80GB``, ``NVIDIA-H100-80GB-HBM3``,
  ``NVIDIA-H200``…) to its MIG family, or ``None`` for GPUs without MIG (T4, L4…).
- ``mig_profiles_for_model(model) -> dict[str, int]``: profile name -> instances per GPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = [
    "MigFamily",
    "MIG_CATALOGUE",
    "family_for_model",
    "mig_profiles_for_model",
    "MIG_PROFILE_RE",
]

#: Shape of a MIG profile name, e.g. ``1g.10gb`` or ``1g.10gb+me`` (media extensions).
MIG_PROFILE_RE = re.compile(r"^[1-8]g\.[0-9]+gb(\+me)?$")


@dataclass(frozen=True)
class MigFamily:
    """One row group of the MIG user guide: a GPU memory size and its slices."""

    name: str
    #: Product label values (after ``NVIDIA-`` prefix removal) that belong here.
    models: tuple[str, ...]
    #: MIG profile name -> number of instances one GPU can hold.
    profiles: dict[str, int] = field(default_factory=dict)


MIG_CATALOGUE: dict[str, MigFamily] = {
    f.name: f
    for f in (
        MigFamily(
            "A30-24GB",
            ("A30", "A30-24GB"),
            {"1g.6gb": 4, "1g.6gb+me": 1, "2g.12gb": 2, "2g.12gb+me": 1, "4g.24gb": 1},
        ),
        MigFamily(
            "A100-40GB",
            ("A100-SXM4-40GB", "A100-PCIE-40GB", "A100-PCIe-40GB"),
            {
                "1g.5gb": 7,
                "1g.5gb+me": 1,
                "1g.10gb": 4,
                "2g.10gb": 3,
                "3g.20gb": 2,
                "4g.20gb": 1,
                "7g.40gb": 1,
            },
        ),
        MigFamily(
            "A100-80GB",
            ("A100-SXM4-80GB", "A100-80GB-PCIe", "A100-PCIE-80GB", "A100-PCIe-80GB"),
            {
                "1g.10gb": 7,
                "1g.10gb+me": 1,
                "1g.20gb": 4,
                "2g.20gb": 3,
                "3g.40gb": 2,
                "4g.40gb": 1,
                "7g.80gb": 1,
            },
        ),
        MigFamily(
            "H100-80GB",
            ("H100-80GB-HBM3", "H100-SXM5-80GB", "H100-PCIe", "H100-PCIE-80GB", "H100-80GB"),
            {
                "1g.10gb": 7,
                "1g.10gb+me": 1,
                "1g.20gb": 4,
                "2g.20gb": 3,
                "3g.40gb": 2,
                "4g.40gb": 1,
                "7g.80gb": 1,
            },
        ),
        MigFamily(
            "H100-94GB",
            ("H100-NVL", "H100-SXM5-94GB", "H100-94GB", "H100-PCIE-94GB"),
            {
                "1g.12gb": 7,
                "1g.12gb+me": 1,
                "1g.24gb": 4,
                "2g.24gb": 3,
                "3g.47gb": 2,
                "4g.47gb": 1,
                "7g.94gb": 1,
            },
        ),
        MigFamily(
            "H200-141GB",
            ("H200", "H200-SXM5-141GB", "H200-NVL", "H200-141GB"),
            {
                "1g.18gb": 7,
                "1g.18gb+me": 1,
                "1g.35gb": 4,
                "2g.35gb": 3,
                "3g.71gb": 2,
                "4g.71gb": 1,
                "7g.141gb": 1,
            },
        ),
    )
}

_MODEL_INDEX: dict[str, MigFamily] = {
    m.upper(): fam for fam in MIG_CATALOGUE.values() for m in fam.models
}


def _normalise(model: str) -> str:
    """GFD writes the NVML name with spaces turned into dashes; newer drivers
    prefix ``NVIDIA-``.  Compare without that prefix, case-insensitively."""
    m = model.strip().upper()
    if m.startswith("NVIDIA-"):
        m = m[len("NVIDIA-") :]
    return m


def family_for_model(model: str) -> MigFamily | None:
    """The MIG family of a GPU model label, or ``None`` if the model has no MIG."""
    return _MODEL_INDEX.get(_normalise(model))


def mig_profiles_for_model(model: str) -> dict[str, int]:
    """MIG profile name -> instances per GPU for ``model`` (empty if no MIG)."""
    fam = family_for_model(model)
    return dict(fam.profiles) if fam else {}
