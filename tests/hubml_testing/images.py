"""hubml's container images as archives for a test cluster's containerd.

Tests that run the real images (hub, singleuser, serving) on a node need them
without a registry: ``dev/images/build.sh`` builds them from their Dockerfiles
with buildah and caches one archive per image (docker-archive, which
``ctr -n k8s.io images import`` takes with the tag as the image name) keyed by
everything that goes into it. This module only runs that script and reads its
``IMAGE_NAME ARCHIVE_PATH`` lines, so the tests and a developer at a shell build
the images the same way, and a warm cache costs seconds.

A cold build takes minutes (torch's CUDA wheels are GiBs), so the timeout is
generous; a failure raises with the log's tail rather than skipping, since a
missing tool or a broken Dockerfile is a defect to see.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[2]
BUILD_SH = REPO / "dev" / "images" / "build.sh"

#: The short names build.sh takes, and the image each stands for.
IMAGES = {
    "hub": "ghcr.io/hubml/k8s-hub-hubml:0.1.0",
    "singleuser": "ghcr.io/hubml/singleuser:0.1.0",
    "serving": "ghcr.io/hubml/serving:0.1.0",
}

#: Cold builds of all three on a 2-core machine; a warm run takes seconds.
DEFAULT_TIMEOUT_S = 3600

LOG_TAIL_LINES = 60


def image_archives(
    names: list[str] | tuple[str, ...] | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    env: dict[str, str] | None = None,
) -> dict[str, pathlib.Path]:
    """Build (or find cached) the image archives and return image name -> archive.

    ``names`` are build.sh's short names (``hub``, ``singleuser``, ``serving``,
    ``base``); None means the three project images. The keys of the result are
    the full image names (``ghcr.io/hubml/singleuser:0.1.0``), as containerd
    lists them after import. Raises RuntimeError with the build log's tail when
    the script fails or prints something unexpected.
    """
    names = list(IMAGES) if names is None else list(names)
    unknown = [n for n in names if n != "base" and n not in IMAGES]
    if unknown:
        raise ValueError(f"unknown image names {unknown}; known: base, {', '.join(IMAGES)}")
    # The log goes to a file, not a pipe: a cold build writes megabytes of it.
    with tempfile.TemporaryFile(mode="w+", prefix="hubml-images-") as log:
        try:
            proc = subprocess.run(
                ["bash", str(BUILD_SH), *names],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                timeout=timeout,
                env={**os.environ, **(env or {})},
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(
                f"dev/images/build.sh {' '.join(names)} ran past {timeout:.0f}s\n{_tail(log)}"
            ) from exc
        if proc.returncode != 0:
            raise RuntimeError(
                f"dev/images/build.sh {' '.join(names)} failed (exit {proc.returncode})\n{_tail(log)}"
            )
        archives = _parse(proc.stdout)
        wanted = {IMAGES[n] for n in names if n in IMAGES}
        missing = wanted - archives.keys()
        if missing or len(archives) != len(names):
            raise RuntimeError(
                f"dev/images/build.sh printed {proc.stdout!r}, expected one line for each of "
                f"{names}\n{_tail(log)}"
            )
        for image, path in archives.items():
            if not path.is_file():
                raise RuntimeError(f"{image}: archive {path} printed but not there\n{_tail(log)}")
        return archives


def _parse(stdout: str) -> dict[str, pathlib.Path]:
    """``IMAGE_NAME ARCHIVE_PATH`` lines -> dict (the path may not hold spaces)."""
    result = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) != 2:
            raise RuntimeError(f"unexpected line from dev/images/build.sh: {line!r}")
        result[parts[0]] = pathlib.Path(parts[1])
    return result


def _tail(log) -> str:
    log.flush()
    log.seek(0)
    lines = log.read().splitlines()
    return "\n".join(lines[-LOG_TAIL_LINES:])
