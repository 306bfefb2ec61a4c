"""The Dockerfiles of the hub, single-user and serving images (built by release tooling, not in CI).

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
DOCKERFILES = ["hub.Dockerfile", "singleuser.Dockerfile", "serving.Dockerfile"]
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


def test_extras_serving_image_is_the_one_serving_dockerfile_builds():
    import yaml

    serving = yaml.safe_load((HELM_VALUES / "hubml-extras" / "values.yaml").read_text())["serving"]["image"]
    ref = f"{serving['name']}:{serving['tag']}"
    assert ref in (IMAGES / "serving.Dockerfile").read_text(), f"serving.Dockerfile does not say it builds {ref}"


def test_serving_image_pins_what_pyproject_pins():
    """Models are logged with pyproject's torch and mlflow; the image that loads them must match."""
    import tomllib

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    pins = dict(req.split(";")[0].split("#")[0].strip().split("==", 1)
                for req in project["optional-dependencies"]["notebook"] if "==" in req)
    text = (IMAGES / "serving.Dockerfile").read_text()
    for pkg in ("mlflow", "torch"):
        assert pkg in pins, f"pyproject.toml no longer pins {pkg}"
        assert f"{pkg}=={pins[pkg]}" in text, f"serving.Dockerfile must install {pkg}=={pins[pkg]} (pyproject.toml)"


def test_hub_image_has_the_registry_client_the_hub_service_uses():
    """hub_ext builds an MlflowClient at set-up; hubml[hub] alone has no mlflow (issue 11's first defect)."""
    import tomllib

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    mlflow_pin = next(r for r in project["optional-dependencies"]["notebook"] if r.startswith("mlflow=="))
    text = (IMAGES / "hub.Dockerfile").read_text()
    assert mlflow_pin.replace("mlflow", "mlflow-skinny") in text or mlflow_pin in text, (
        f"hub.Dockerfile must install the MLflow client at the tracking server's version ({mlflow_pin})")
    assert "mlflow.tracking" in text, "hub.Dockerfile's import check must import the MLflow client"


def test_hub_ext_default_images_are_the_projects_own():
    """Training runs in the single-user image (torch + mlflow), serving in the serving image."""
    from hubml.hub_ext.app import HubMLService

    svc = HubMLService()
    assert svc.default_image == "{name}:{tag}".format(**merged_values()["singleuser"]["image"])
    assert svc.serving_image in (IMAGES / "serving.Dockerfile").read_text()


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
