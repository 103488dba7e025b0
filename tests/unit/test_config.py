"""Configuration: environment, TOML file, validation, and the `config` command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_settings

CLI = [sys.executable, "-m", "pipeline.cli.main"]


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "morag.toml"
    config.write_text('whisper_model = "small"\napi_port = 9000\n')
    monkeypatch.setenv("MORAG_CONFIG", str(config))
    monkeypatch.setenv("MORAG_API_PORT", "9100")
    settings = load_settings()
    assert settings.whisper_model == "small"
    assert settings.api_port == 9100


def test_bad_values_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MORAG_API_PORT", "70000")
    monkeypatch.setenv("MORAG_BROKER_URL", "redis://localhost")
    monkeypatch.setenv("MORAG_WHISPER_DEVICE", "tpu")
    with pytest.raises(ConfigError) as error:
        load_settings()
    text = str(error.value)
    assert "MORAG_API_PORT: Input should be less than or equal to 65535 (got '70000')" in text
    assert "MORAG_BROKER_URL: Value error, must start with amqp:// or amqps://" in text
    assert "MORAG_WHISPER_DEVICE" in text and "'tpu'" in text


@pytest.mark.parametrize(
    ("spec", "error"),
    [("* * *", "must be a five-field cron spec"), ("a b c d e", "not a cron spec")],
)
def test_a_bad_sweep_schedule_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, spec: str, error: str
) -> None:
    monkeypatch.setenv("MORAG_SWEEP_CRON", spec)
    with pytest.raises(ConfigError, match=f"MORAG_SWEEP_CRON: Value error, {error}"):
        load_settings()


@pytest.mark.parametrize("spec", ["* * * * *", "*/5 * * * *", "@hourly"])
def test_a_sweep_schedule_periodiq_reads_is_accepted(monkeypatch: pytest.MonkeyPatch, spec: str) -> None:
    monkeypatch.setenv("MORAG_SWEEP_CRON", spec)
    assert load_settings().sweep_cron == spec


def test_missing_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MORAG_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="no such file"):
        load_settings()


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    import os

    clean = {k: v for k, v in os.environ.items() if not k.startswith("MORAG_")}
    return subprocess.run([*CLI, *args], env={**clean, **env}, capture_output=True, text=True, timeout=60)


def test_config_show_redacts_secrets() -> None:
    proc = run_cli("config", "show", MORAG_BROKER_URL="amqp://worker:s3cret@broker:5672/%2F")
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["broker_url"] == "amqp://worker:****@broker:5672/%2F"
    assert "s3cret" not in proc.stdout


def test_config_check_fails_with_one_line_per_problem() -> None:
    proc = run_cli("config", "check", MORAG_API_PORT="zero", MORAG_LOG_LEVEL="loud")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == "morag-pipeline: bad configuration:"
    assert any(line.strip().startswith("MORAG_API_PORT:") for line in lines)
    assert any(line.strip().startswith("MORAG_LOG_LEVEL: Value error, must be one of") for line in lines)
    assert "Traceback" not in proc.stderr


def test_config_check_passes() -> None:
    proc = run_cli("config", "check")
    assert proc.returncode == 0
    assert proc.stdout.startswith("configuration is valid")
