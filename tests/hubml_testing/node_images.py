"""The two tiny images the real node needs besides hubml's own: the pod sandbox ("pause")
and a busybox toolbox for network probes, made here from Debian's packages because no
registry can be pulled from.

Each is a one-layer image written as a docker-archive (what `ctr images import` reads),
cached under ~/.cache/hubml/node-images/ by a key of its inputs, so a warm run copies
nothing. The pause binary is compiled from pause.c beside dev/kube (as Kubernetes' own
build/pause does: a static C program that reaps zombies and exits on SIGINT/SIGTERM).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from hubml_testing.kube_binaries import KUBE_DEV_DIR, KubeHarnessError

PAUSE_IMAGE = "hubml.local/pause:3.10"
BUSYBOX_IMAGE = "hubml.local/busybox:1.35"
PAUSE_SOURCE = KUBE_DEV_DIR / "pause.c"
BUSYBOX_BINARY = Path("/bin/busybox")  # Debian's busybox-static
#: the applets the network tests use, as symlinks in the busybox image
BUSYBOX_APPLETS = ("sh", "sleep", "nslookup", "nc", "wget", "httpd", "cat", "echo", "ip", "hostname", "ls", "true")


@dataclass(frozen=True)
class NodeImage:
    name: str
    archive: Path


def cache_dir() -> Path:
    root = Path(os.environ.get("HUBML_CACHE", Path.home() / ".cache" / "hubml"))
    return root / "node-images"


def _layer(files: dict[str, tuple[bytes, int]], links: dict[str, str]) -> bytes:
    """A reproducible layer tar: fixed mtimes and owners, so the key of the inputs fixes the digest."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = sorted({str(Path(p).parent) for p in [*files, *links]} - {"."})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
            tar.addfile(info)
        for path, (data, mode) in sorted(files.items()):
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))
        for path, target in sorted(links.items()):
            info = tarfile.TarInfo(path)
            info.type, info.linkname, info.mode, info.mtime = tarfile.SYMTYPE, target, 0o777, 0
            tar.addfile(info)
    return buf.getvalue()


def _write_archive(dest: Path, name: str, layer: bytes, entrypoint: list[str], cmd: list[str] | None) -> None:
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": entrypoint, "Cmd": cmd, "Env": ["PATH=/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "hubml_testing.node_images"}],
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    manifest = [{"Config": config_name, "RepoTags": [name], "Layers": ["layer.tar"]}]
    tmp = dest.with_suffix(".partial")
    with tarfile.open(tmp, "w") as tar:
        for member, data in ((config_name, config_bytes), ("layer.tar", layer),
                             ("manifest.json", json.dumps(manifest).encode())):
            info = tarfile.TarInfo(member)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    tmp.replace(dest)


def _cached(name: str, key_parts: list[bytes], build) -> NodeImage:
    key = hashlib.sha256(b"\0".join([name.encode(), *key_parts])).hexdigest()[:16]
    out = cache_dir()
    out.mkdir(parents=True, exist_ok=True)
    stem = name.split("/")[-1].replace(":", "-")
    dest = out / f"{stem}-{key}.tar"
    if not dest.exists():
        for old in out.glob(f"{stem}-*.tar"):
            old.unlink()
        build(dest)
    return NodeImage(name, dest)


def pause_image() -> NodeImage:
    """The sandbox image containerd starts first in every pod (its `sandbox_image`)."""
    source = PAUSE_SOURCE.read_bytes()
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise KubeHarnessError("the real node's pause image needs a C compiler (gcc) to build dev/kube/pause.c")

    def build(dest: Path) -> None:
        binary = dest.with_suffix(".bin")
        proc = subprocess.run([cc, "-Os", "-static", "-o", str(binary), str(PAUSE_SOURCE)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise KubeHarnessError(f"compiling {PAUSE_SOURCE} failed (static glibc is libc6-dev's libc.a):\n{proc.stderr}")
        layer = _layer({"pause": (binary.read_bytes(), 0o755)}, {})
        binary.unlink()
        _write_archive(dest, PAUSE_IMAGE, layer, ["/pause"], None)

    return _cached(PAUSE_IMAGE, [source, cc.encode()], build)


def _has_interpreter(elf: bytes) -> bool:
    """True for a dynamically linked ELF64 binary (a PT_INTERP program header)."""
    import struct

    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        return True  # not a 64-bit ELF: treat as unusable
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    return any(struct.unpack_from("<I", elf, phoff + i * phentsize)[0] == 3 for i in range(phnum))


def busybox_image() -> NodeImage:
    """A static busybox with the applets network probes need (nslookup, nc, wget, httpd)."""
    if not BUSYBOX_BINARY.exists():
        raise KubeHarnessError(
            f"{BUSYBOX_BINARY} is missing: install Debian's busybox-static (dev/bootstrap does) for the real node's probes"
        )
    data = BUSYBOX_BINARY.read_bytes()
    if _has_interpreter(data):
        raise KubeHarnessError(f"{BUSYBOX_BINARY} is dynamically linked and cannot run in a scratch image; "
                               "install Debian's busybox-static instead of busybox (dev/bootstrap does)")

    def build(dest: Path) -> None:
        links = {f"bin/{a}": "busybox" for a in BUSYBOX_APPLETS}
        layer = _layer({"bin/busybox": (data, 0o755), "etc/passwd": (b"root:x:0:0:root:/:/bin/sh\n", 0o644),
                        "tmp/.keep": (b"", 0o644)}, links)
        _write_archive(dest, BUSYBOX_IMAGE, layer, [], ["/bin/sh"])

    return _cached(BUSYBOX_IMAGE, [hashlib.sha256(data).digest(), ",".join(BUSYBOX_APPLETS).encode()], build)
