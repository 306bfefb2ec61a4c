"""The one grammar for the durations, memory sizes and Kubernetes quantities people write.

Every part reads these from humans: the profile catalogue (``idle_timeout``,
``memory``), the culler's settings (``--timeout``, ``profiles``) and the magics
(``%%train --timeout``).  One parser each means a value accepted in one place is
accepted, with the same meaning, everywhere else; the copies that lived in
``profiles``, ``jobs`` and the culler had drifted apart (``"1h30m"`` only in the
catalogue, ``"0"`` only in the culler).

Pure: no I/O, no imports beyond the error hierarchy.
"""

from __future__ import annotations

import math
import re
from typing import Any

from hubml.errors import InvalidRequest

__all__ = [
    "parse_duration",
    "parse_memory",
    "format_memory",
    "cpu_quantity",
    "int_quantity",
    "DURATION_EXAMPLES",
]

#: What the error messages offer; also the README's list of accepted forms.
DURATION_EXAMPLES = "90, 90s, 30m, 1h30m, 1.5h or 2d"

_NUM = r"(\d+(?:\.\d+)?)"
#: Components in descending order, each at most once, optional spaces between.
_DURATION_RE = re.compile(rf"^(?:{_NUM}d)?\s*(?:{_NUM}h)?\s*(?:{_NUM}m)?\s*(?:{_NUM}s)?$")
_UNIT_SECONDS = (86400, 3600, 60, 1)
_MEMORY_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([KMGT]i?)?$")
_MEMORY_UNITS = {None: 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_duration(value: Any, what: str = "", *, allow_zero: bool = False) -> float:
    """Seconds in ``value``: a number of seconds, or ``90s``, ``30m``, ``1h30m``, ``1.5h``, ``2d``.

    ``what`` names the setting in the message (``--timeout``, ``field 'idle_timeout'``).
    Zero is refused unless ``allow_zero`` (the culler's ``max_age: 0`` means "no
    limit"; a zero idle timeout or job timeout means nothing sensible).  Raises
    :class:`InvalidRequest`, a ``ValueError``, whose message says what forms work.
    """
    label = f"{what} {value!r}" if what else repr(value)
    bound = ">= 0" if allow_zero else "positive"
    seconds: float | None = None
    if isinstance(value, bool):
        seconds = None
    elif isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        if re.fullmatch(_NUM, text):
            seconds = float(text)
        else:
            m = _DURATION_RE.match(text)
            if text and m and any(m.groups()):
                seconds = sum(float(g) * unit for g, unit in zip(m.groups(), _UNIT_SECONDS) if g is not None)
    if seconds is None:
        raise InvalidRequest(
            f"{label} is not a duration: write a number of seconds or numbers with the units "
            f"d, h, m and s, largest first (for example {DURATION_EXAMPLES})."
        )
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        raise InvalidRequest(f"{label} is not a duration here: it must be finite and {bound} (for example 30m).")
    return seconds


def parse_memory(value: Any) -> int:
    """Bytes in ``value``: an int, or a number with a binary suffix K/M/G/T (``Gi`` accepted).

    Same meaning as JupyterHub's ``ByteSpecification`` (``4G`` = 4 GiB), so a value
    accepted here is accepted by KubeSpawner's ``mem_guarantee``/``mem_limit``.
    """
    if isinstance(value, bool):
        raise InvalidRequest(f"{value!r} is not a memory size; write e.g. '16G'")
    if isinstance(value, int):
        if value <= 0:
            raise InvalidRequest(f"{value!r} must be a positive number of bytes")
        return value
    if isinstance(value, str):
        m = _MEMORY_RE.match(value.strip())
        if m:
            unit = m.group(2)[0] if m.group(2) else None
            n = int(float(m.group(1)) * _MEMORY_UNITS[unit])
            if n > 0:
                return n
    raise InvalidRequest(f"{value!r} is not a memory size; write e.g. '512M', '16G', '1T' (binary units)")


def format_memory(n: int) -> str:
    """Short human form of a byte count (``17179869184`` -> ``16 GiB``)."""
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"


def cpu_quantity(cores: float) -> str:
    """Kubernetes CPU quantity for ``cores`` (``2`` -> ``"2"``, ``0.5`` -> ``"500m"``)."""
    milli = int(round(cores * 1000))
    return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"


def int_quantity(v: Any) -> int:
    """An extended-resource count from a Node or Pod (``"8"``, ``8``, missing -> 0).

    Extended resources are whole numbers; anything unreadable counts as none,
    because a node that advertises garbage must not look like free capacity.
    """
    if v is None:
        return 0
    try:
        return int(v)
    except (TypeError, ValueError):
        try:
            return int(float(v))
        except (TypeError, ValueError):
            return 0
