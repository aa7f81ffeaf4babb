"""Settings come from PLUGINPOOL_* variables; invalid values name the variable."""

from __future__ import annotations

import pytest

from pluginpool.policy.errors import SettingsError
from pluginpool.tasks.settings import Settings


def test_defaults_follow_the_redis_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLUGINPOOL_REDIS_URL", "redis://example:6380/3")
    settings = Settings.from_env(_env_file=None)
    assert settings.effective_broker_url == "redis://example:6380/3"
    assert settings.effective_result_backend == "redis://example:6380/3"
    assert settings.max_payload_bytes == 1_048_576
    assert settings.keys.specs == "pluginpool:registry:specs"


def test_nested_limits_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLUGINPOOL_DEFAULT_LIMITS__TIMEOUT_MS", "1500")
    assert Settings.from_env(_env_file=None).default_limits.timeout_ms == 1500


@pytest.mark.parametrize(("variable", "value"), [
    ("PLUGINPOOL_MAX_PAYLOAD_BYTES", "lots"),
    ("PLUGINPOOL_REDIS_URL", "http://nope"),
    ("PLUGINPOOL_VISIBILITY_TIMEOUT_S", "1"),
])
def test_invalid_values_name_the_variable(monkeypatch: pytest.MonkeyPatch, variable: str,
                                          value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as info:
        Settings.from_env(_env_file=None)
    assert variable in str(info.value)


def test_the_readme_documents_every_setting() -> None:
    """The README's settings table stays true: every PLUGINPOOL_* variable is in it."""
    from tests.conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    missing = [name for name in Settings.model_fields  # nested ones as PLUGINPOOL_X__<FIELD>
               if f"`PLUGINPOOL_{name.upper()}`" not in readme
               and f"`PLUGINPOOL_{name.upper()}__<FIELD>`" not in readme]
    assert not missing, missing


def test_a_misspelt_variable_is_warned_of_with_the_setting_it_meant(redis_url: str) -> None:
    """Before, PLUGINPOOL_REDIS_ULR was ignored without a word and the default used (the
    deployment's data went to database 0). It is a warning, not an error: the command
    still runs with what it was given."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PLUGINPOOL_REDIS_URL": redis_url, "PLUGINPOOL_REDIS_ULR": "x",
           "PLUGINPOOL_NO_SUCH_THING": "1"}
    done = subprocess.run([sys.executable, "-m", "pluginpool.pool.tools.cli", "plugins",
                           "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert ("PLUGINPOOL_REDIS_ULR is not a pluginpool setting (ignored); did you mean "
            "PLUGINPOOL_REDIS_URL?") in done.stderr
    assert "PLUGINPOOL_NO_SUCH_THING is not a pluginpool setting (ignored)\n" in done.stderr
    assert "PLUGINPOOL_REDIS_URL is not" not in done.stderr
