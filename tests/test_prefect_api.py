"""The CLI's early start of Prefect's temporary API (flows/prefect_api.py): when it starts one,
that the server it starts is a working Prefect API, and that `rlhf run` uses it (not a second
one of Prefect's) and leaves nothing running."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from flows.prefect_api import TemporaryAPI, configured_elsewhere, serving
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


def _profiles(tmp_path: Path, text: str) -> dict[str, str]:
    (tmp_path / "profiles.toml").write_text(text)
    return {"PREFECT_HOME": str(tmp_path)}


@pytest.mark.parametrize("env_extra, profiles, configured", [
    ({}, None, False),                                            # nothing: Prefect's default
    ({"PREFECT_API_URL": "http://127.0.0.1:4200/api"}, None, True),
    ({"PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "false"}, None, True),  # temporary APIs ruled out
    ({}, 'active = "team"\n[profiles.team]\nPREFECT_API_URL = "http://h:4200/api"\n', True),
    ({}, 'active = "local"\n[profiles.local]\n[profiles.team]\n'
         'PREFECT_API_URL = "http://h:4200/api"\n', False),        # another profile has one
    ({"PREFECT_PROFILE": "team"}, 'active = "local"\n[profiles.local]\n[profiles.team]\n'
                                  'PREFECT_API_URL = "http://h:4200/api"\n', True),
    ({}, "not = [toml", False),                                   # Prefect reports that itself
], ids=["nothing", "env-url", "ephemeral-off", "active-profile", "other-profile",
        "PREFECT_PROFILE", "broken-profiles"])
def test_an_api_configured_in_the_environment_or_the_active_profile_is_left_to_prefect(
        tmp_path, env_extra, profiles, configured):
    env = {"PREFECT_HOME": str(tmp_path), **env_extra}
    if profiles is not None:
        env.update(_profiles(tmp_path, profiles))
    assert configured_elsewhere(env) is configured


def test_the_temporary_api_answers_as_prefect_and_stops(tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    api = TemporaryAPI()
    try:
        # No API in Prefect's settings (in the suite, another test's harness may have set one),
        # and the flow's settings inside serving() name our server.
        with temporary_settings(restore_defaults={PREFECT_API_URL}), serving(api):
            settings = get_current_settings()
            url = settings.api.url
            assert url == api.url and settings.flows.heartbeat_frequency is None
            with urllib.request.urlopen(f"{url}/admin/version", timeout=10) as r:
                assert r.status == 200 and re.fullmatch(rb'"\d+\.\d+\.\d+.*"', r.read())
    finally:
        proc = api.proc
        api.stop()
    assert proc.poll() is not None  # stopped, and reaped
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{url}/health", timeout=5)
    api.stop()  # idempotent (the atexit hook calls it again)


def test_an_api_named_by_prefects_settings_wins_over_the_early_start(tmp_path, monkeypatch):
    """Settings the early check cannot see (``.env``, ``prefect.toml``; here a temporary
    setting) name an API: the server started early is stopped unused, and the flow would run
    against theirs."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    theirs = "http://127.0.0.1:9/api"
    api = TemporaryAPI()
    proc = api.proc
    with temporary_settings({PREFECT_API_URL: theirs}):
        with serving(api):
            assert get_current_settings().api.url == theirs
    assert proc.poll() is not None and api.proc is None


def test_rlhf_run_without_a_server_runs_on_the_api_it_started_and_leaves_none(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PREFECT_HOME=str(tmp_path / "prefect"))
    args = [a for o in TINY for a in ("--set", o)]
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", *args,
         "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
         "--set", f"output_dir={tmp_path}/runs", "--set", "feedback.on_refusal=stop"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode in (0, 2), out[-3000:]  # promoted, or refused by the gate
    assert '"result"' in proc.stdout, out[-3000:]
    # Prefect found an API configured: it started no temporary server of its own.
    assert "Starting temporary server" not in out, out[-3000:]
    # The flow ran against ours (its address is in the run's link), and ours is gone.
    port = re.search(r"View at http://127\.0\.0\.1:(\d+)/", out)
    assert port, out[-3000:]
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port[1]}/api/health", timeout=5)
    # The run is in the database the server kept in PREFECT_HOME.
    assert (tmp_path / "prefect" / "prefect.db").is_file()
