"""The Dockerfiles of the hub and single-user images (built by release tooling, not in CI).

What can be checked without building: every base image and package is pinned,
every file they COPY exists in the repository, and the IPython configuration
the single-user image installs really loads hubml's magics in a real kernel.
"""

from __future__ import annotations

import re
import shutil

import pytest

from hubml_testing.helm_values import HELM_VALUES, REPO_ROOT, merged_values

IMAGES = HELM_VALUES / "images"
DOCKERFILES = ["hub.Dockerfile", "singleuser.Dockerfile"]
IPYTHON_CONFIG = IMAGES / "ipython" / "ipython_kernel_config.py"


def instructions(name: str) -> list[tuple[str, str]]:
    text = (IMAGES / name).read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_image_is_pinned(name):
    froms = [rest for word, rest in instructions(name) if word == "FROM"]
    assert froms, f"{name} has no FROM"
    for image in froms:
        ref = image.split()[0]
        tag = ref.rsplit(":", 1)[1] if ":" in ref.split("/")[-1] else ""
        assert tag and tag != "latest" and re.search(r"\d+\.\d+\.\d+", tag), f"{name}: base {ref} is not pinned to a version"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_pip_installs_are_pinned(name):
    for word, rest in instructions(name):
        if word != "RUN" or "pip install" not in rest:
            continue
        command = rest.split("&&")[[i for i, part in enumerate(rest.split("&&")) if "pip install" in part][0]]
        args = command.split("pip install", 1)[1].split()
        packages = [a.strip('"') for a in args if not a.startswith("-")]
        assert packages, f"{name}: empty pip install"
        for pkg in packages:
            assert pkg.startswith("/src/hubml") or re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[0-9][0-9A-Za-z.]*", pkg), (
                f"{name}: {pkg!r} is not pinned (use NAME==VERSION, or hubml from /src with pyproject's pins)"
            )


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copied_files_exist(name):
    for word, rest in instructions(name):
        if word == "COPY":
            sources = rest.split()[:-1]
            for src in sources:
                assert (REPO_ROOT / src).exists() or src == "README.md", f"{name}: COPY {src}: not in the repository"


def test_values_reference_the_images_the_dockerfiles_build():
    values = merged_values()
    for name, key in (("hub.Dockerfile", "hub"), ("singleuser.Dockerfile", "singleuser")):
        image = values[key]["image"]
        ref = f"{image['name']}:{image['tag']}"
        assert ref in (IMAGES / name).read_text(), f"{name} does not say it builds {ref} (values.yaml {key}.image)"


def test_singleuser_ipython_config_loads_the_magics(kernel_factory, tmp_path):
    """The file the image puts in /etc/ipython, used as a profile's kernel config, loads hubml."""
    ipython_dir = tmp_path / "ipython"
    profile = ipython_dir / "profile_default"
    profile.mkdir(parents=True)
    shutil.copy(IPYTHON_CONFIG, profile / "ipython_kernel_config.py")
    kernel = kernel_factory(load_ext=False, extra_env={"IPYTHONDIR": str(ipython_dir)})
    result = kernel.run_ok(
        "ip = get_ipython()\n"
        "print(sorted(ip.extension_manager.loaded))\n"
        "print('train' in ip.magics_manager.magics['cell'], 'deploy' in ip.magics_manager.magics['line'])\n"
    )
    assert "'hubml'" in result.stdout, result.stdout
    assert "True True" in result.stdout, result.stdout
