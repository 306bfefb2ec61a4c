"""One duration grammar: the same corpus through every place a person writes a duration.

``hubml.quantities.parse_duration`` is the grammar. Before it, the catalogue,
the culler and ``%%train`` each had their own, and ``"1h30m"`` passed the
spawner's catalogue but stopped the culler when the same profile reached its
``profiles`` setting. So the corpus goes through each real entry point, not only
the function:

(a) the spawner's catalogue: ``load_catalogue`` -> ``idle_timeout_seconds`` and the
    ``hubml.io/idle-timeout`` annotation that ``hubml.spawner.expansion`` puts on the pod;
(b) the culler's own configuration: ``CullerApp``'s ``--timeout`` (command line and
    config file), ``--profiles`` (inline JSON) and ``--spawner-profiles`` (the
    catalogue the culler builds from the spawner's YAML list); a refused value makes
    ``main`` exit 2 with a message naming the setting, before any request;
(c) ``%%train --timeout`` in a real kernel with ``%load_ext hubml``: a refused value is
    one ``UsageError`` and nothing is created; an accepted one passes the magic and its
    seconds reach the ``TrainSpec`` (read through the magic's own parser and
    ``train_spec``, without starting a job).
"""

from __future__ import annotations

import json
import math
import shlex

import pytest
import yaml

from hubml.culler.app import CullerApp, main as culler_main
from hubml.errors import InvalidRequest
from hubml.profile_config import load_catalogue
from hubml.profiles import ANNOTATION_IDLE_TIMEOUT, ProfileConfigError
from hubml.quantities import parse_duration
from hubml.spawner.expansion import expand_profile
from hubml_testing.kernel import KernelSession
from hubml_testing.train_cells import QUICK_CELL, job_dirs, job_processes

#: (value as written, seconds it means): every entry point must accept these.
VALID = [
    ("90", 90),
    (90, 90),
    (90.0, 90),
    ("45", 45),
    ("90s", 90),
    ("30m", 1800),
    ("1h30m", 5400),
    ("1h 30m", 5400),
    ("1.5h", 5400),
    ("0.5m", 30),
    ("2d", 172800),
    (" 2H ", 7200),
    ("1d2h3m4s", 93784),
]

#: Values every entry point must refuse (0 too: no idle timeout or job timeout of 0).
INVALID = [
    "soon", "30 min", "5 m", "-5", -5, "nan", math.nan, "inf", math.inf, "-inf", "1m1h", "1h-5m",
    "10x", "m", "1e3", "", "   ", True, False, "0", 0, 0.0, [1],
]


def _ids(values):
    return [repr(v) for v in values]


# ------------------------------------------------------------------ the grammar itself


@pytest.mark.parametrize("value, seconds", VALID, ids=_ids(v for v, _ in VALID))
def test_grammar_accepts(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", INVALID, ids=_ids(INVALID))
def test_grammar_refuses_with_the_setting_named(value):
    with pytest.raises(InvalidRequest, match=r"^--timeout .* is not a duration") as info:
        parse_duration(value, "--timeout")
    assert "30m" in str(info.value)  # says what to write instead


def test_zero_only_where_a_setting_gives_it_a_meaning():
    assert parse_duration("0", allow_zero=True) == 0 == parse_duration("0s", allow_zero=True)
    with pytest.raises(InvalidRequest, match="finite and >= 0"):
        parse_duration(-1, allow_zero=True)


# ------------------------------------------------------------------ (a) the spawner's catalogue


def _spawner(value):
    """Seconds the spawner puts on the pod for ``idle_timeout: value``; raises if refused."""
    profile = load_catalogue([{"name": "gpu", "idle_timeout": value}]).get("gpu")
    annotation = expand_profile(profile)["kubespawner_override"]["extra_annotations"][ANNOTATION_IDLE_TIMEOUT]
    assert annotation == str(profile.idle_timeout_seconds) and annotation.isdigit(), annotation
    return profile.idle_timeout_seconds


@pytest.mark.parametrize("value, seconds", VALID, ids=_ids(v for v, _ in VALID))
def test_spawner_catalogue_accepts(value, seconds):
    assert _spawner(value) == seconds


@pytest.mark.parametrize("value", INVALID, ids=_ids(INVALID))
def test_spawner_catalogue_refuses(value):
    with pytest.raises(ProfileConfigError, match=r"profile 'gpu' \(#1\), field 'idle_timeout': .* is not a duration"):
        _spawner(value)


def test_spawner_rounds_fractions_up_to_whole_seconds():
    assert _spawner("0.5s") == 1 and _spawner(1.2) == 2


# ------------------------------------------------------------------ (b) the culler's settings


@pytest.fixture
def culler_env(monkeypatch, tmp_path):
    monkeypatch.setenv("JUPYTERHUB_API_URL", "http://127.0.0.1:9/hub/api")  # never contacted
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "not-used")
    return tmp_path


def _culler_paths(value, tmp_path):
    """argv for each way the culler reads a duration, and where the policy shows it."""
    config = tmp_path / "culler_config.json"
    config.write_text(json.dumps({"CullerApp": {"timeout": value}}))
    spawner = tmp_path / "profiles.yaml"
    spawner.write_text(yaml.safe_dump([{"name": "gpu", "idle_timeout": value}]))
    text = value if isinstance(value, str) else str(value)
    return {
        "--timeout": ([f"--timeout={text}"], lambda policy: policy.default.idle_timeout),
        "CullerApp.timeout (config file)": ([f"--config={config}"], lambda policy: policy.default.idle_timeout),
        "--profiles": ([f"--profiles={json.dumps({'gpu': {'idle_timeout': value}})}"],
                       lambda policy: policy.profiles["gpu"].idle_timeout),
        "--spawner-profiles": ([f"--spawner-profiles={spawner}"], lambda policy: policy.profiles["gpu"].idle_timeout),
    }


@pytest.mark.parametrize("value, seconds", VALID, ids=_ids(v for v, _ in VALID))
def test_culler_settings_accept(value, seconds, culler_env):
    for path, (argv, read) in _culler_paths(value, culler_env).items():
        app = CullerApp()
        app.initialize(argv)
        culler = app.build()  # what start-up validates, before any request
        culler.hub.close()
        assert read(app.policy_config()) == seconds, path


@pytest.mark.parametrize("value", INVALID, ids=_ids(INVALID))
def test_culler_settings_refuse(value, culler_env, capsys):
    for path, (argv, _) in _culler_paths(value, culler_env).items():
        # --once: were the value wrongly accepted, one pass fails on the unreachable hub instead of running on
        assert culler_main([*argv, "--once"]) == 2, path
        err = capsys.readouterr().err
        assert "configuration error" in err and "Nothing was changed" in err, (path, err)
        assert "timeout" in err and ("duration" in err or "greater than 0" in err), (path, err)


def test_culler_zero_keeps_its_meaning_for_max_age_and_grace_period(culler_env):
    app = CullerApp()
    app.initialize(["--max-age=0", "--grace-period=0", '--profiles={"gpu": {"idle_timeout": "1h30m", "max_age": 0}}'])
    policy = app.policy_config()
    assert policy.default.max_age == 0 and policy.grace_period == 0
    assert policy.profiles["gpu"].idle_timeout == 5400 and policy.profiles["gpu"].max_age == 0
    assert culler_main(["--cull-every=0", "--once"]) == 2


# ------------------------------------------------------------------ (c) %%train --timeout

CELL = "\n" + QUICK_CELL

_SPEC = """
from hubml.magics.train import parse_line, train_spec
_magic = get_ipython().magics_manager.registry["TrainMagics"].train
print(repr(train_spec(parse_line(_magic, {line!r}), {cell!r}).timeout))
"""


def _option(value) -> str:
    return shlex.quote(f"--timeout={value if isinstance(value, str) else value!s}")


def test_train_timeout_corpus(hubml_kernel: KernelSession, hubml_home):
    problems = []

    def created() -> bool:
        return bool(job_dirs(hubml_home) or (hubml_home / "mlflow.db").exists()
                    or job_processes(hubml_home, hubml_kernel))

    for value, seconds in VALID:
        # the magic itself gets past --timeout: the refusal is the --workers 0 that follows it
        res = hubml_kernel.run(f"%%train {_option(value)} --workers 0" + CELL, timeout=60)
        if res.ename != "UsageError" or "--timeout" in (res.evalue or "") or "--workers" not in (res.evalue or ""):
            problems.append(f"{value!r}: the magic did not accept it: {res.ename}: {res.evalue}")
        # and the seconds it reads are the grammar's
        res = hubml_kernel.run(_SPEC.format(line=_option(value), cell=QUICK_CELL), timeout=60)
        if res.status != "ok" or res.stdout.strip() != repr(float(seconds)):
            problems.append(f"{value!r}: TrainSpec.timeout {res.stdout.strip()!r} != {float(seconds)!r} "
                            f"({res.error_text})")
    for value in INVALID:
        # --workers 0 after it: were the value wrongly accepted, still no job would start
        res = hubml_kernel.run(f"%%train {_option(value)} --workers 0" + CELL, timeout=60)
        message = res.evalue or ""
        if res.ename != "UsageError" or not message.startswith("--timeout ") or "is not a duration" not in message:
            problems.append(f"{value!r}: expected a UsageError naming --timeout, got {res.ename}: {message}")
    if created():
        problems.append(f"something was created: jobs={job_dirs(hubml_home)}")
    assert not problems, "\n".join(problems)
