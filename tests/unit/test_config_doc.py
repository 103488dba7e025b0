"""docs/configuration.md and ops/morag.env.example are generated from the settings model and kept
current; the template's values are the defaults."""

from __future__ import annotations

import os
import subprocess
import sys

from pipeline.config import Settings
from pipeline.config_doc import DOC_PATH, ENV_PATH, render, render_env, source_blocks
from tests.conftest import ROOT

SOURCE = '''
class Settings:
    """Doc."""

    # Broker.
    broker_url: str = "amqp://"
    broker_max_priority: int = 10
    # classic or quorum.
    broker_queue_type: str = "classic"

    # Cost model: seconds per second.
    gpu_factor: float = Field(
        0.02, gt=0
    )  # on a GPU
    cpu_factor: float = 0.25

    def method(self) -> None:
        # not a setting
        pass
'''


def test_the_reference_and_the_template_are_current() -> None:
    for path, wanted in ((DOC_PATH, render()), (ENV_PATH, render_env())):
        assert (ROOT / path).read_text() == wanted, (
            f"{path} is out of date: run python -m pipeline.config_doc"
        )


def test_the_template_uncommented_gives_the_defaults(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Every line of ops/morag.env.example, uncommented, sets its setting to its default."""
    values = {}
    for line in (ROOT / ENV_PATH).read_text().splitlines():
        if line.startswith("#MORAG_"):
            name, _, value = line[1:].partition("=")
            values[name] = value
    assert set(values) == {f"MORAG_{name.upper()}" for name in Settings.model_fields}
    for name in [k for k in os.environ if k.startswith("MORAG_")]:
        monkeypatch.delenv(name)
    defaults = Settings().model_dump()
    for name, value in values.items():
        if value and not value.startswith("~"):  # a home folder is the reader's own
            monkeypatch.setenv(name, value)
    assert Settings().model_dump() == defaults


def test_every_setting_is_in_the_reference_with_its_environment_name() -> None:
    text = render()
    for name in Settings.model_fields:
        assert f"| `MORAG_{name.upper()}` |" in text


def test_comments_go_with_the_settings_below_them() -> None:
    blocks = source_blocks(SOURCE)
    assert [(b.comment, b.names, b.opens_section) for b in blocks] == [
        (["Broker."], ["broker_url", "broker_max_priority"], True),
        (["classic or quorum."], ["broker_queue_type"], False),
        (["Cost model: seconds per second."], ["gpu_factor", "cpu_factor"], True),
    ]
    assert blocks[2].notes == {"gpu_factor": "on a GPU"}


def test_check_fails_on_a_stale_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    stale, template = tmp_path / "configuration.md", tmp_path / "morag.env.example"
    stale.write_text(render().replace("MORAG_BROKER_URL", "MORAG_BROKER_ADDRESS"))
    template.write_text(render_env())
    paths = ["--output", str(stale), "--env-output", str(template)]
    command = [sys.executable, "-m", "pipeline.config_doc", *paths]
    proc = subprocess.run([*command, "--check"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1
    assert proc.stderr == f"{stale} is out of date: run python -m pipeline.config_doc\n"
    subprocess.run(command, check=True, cwd=ROOT)
    assert subprocess.run([*command, "--check"], cwd=ROOT).returncode == 0
