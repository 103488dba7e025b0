"""Task and control messages name their schema; a reader refuses one it does not read, with the reason."""

from __future__ import annotations

import pytest

from pipeline import control
from pipeline.errors import BadInput, UnsupportedSchema
from pipeline.task_message import JOB_SCHEMA, check_job, job_schema


def test_every_report_names_the_schema_it_is_written_in() -> None:
    for actor in sorted(control.OUTCOMES | control.HEARTBEATS):
        assert control.report(actor, task_id="t").options[control.SCHEMA_OPTION] == control.SCHEMA


@pytest.mark.parametrize("written", [None, 1])
def test_the_schemas_this_release_reads_pass(written: object) -> None:
    control.check_schema(written, "the report", newest=1, oldest=1, upgrade="the server")
    check_job({"task_id": "t"} if written is None else {"task_id": "t", "schema": written})


def test_a_newer_schema_is_refused_naming_what_to_upgrade() -> None:
    with pytest.raises(
        UnsupportedSchema, match=r"schema 3, newer than this release reads \(2\): upgrade the server"
    ):
        control.check_schema(3, "the report", newest=2, oldest=1, upgrade="the server")
    with pytest.raises(UnsupportedSchema, match="upgrade this worker") as refused:
        check_job({"task_id": "t", "schema": JOB_SCHEMA + 1})
    assert isinstance(refused.value, BadInput)  # the task fails at once, to the dead letters


@pytest.mark.parametrize("written", ["2", 1.5, True, [1]])
def test_a_schema_that_is_not_a_number_is_refused(written: object) -> None:
    with pytest.raises(UnsupportedSchema, match="not a schema number"):
        control.check_schema(written, "the report", newest=1, oldest=1, upgrade="the server")


def test_an_older_schema_than_the_oldest_read_is_refused() -> None:
    with pytest.raises(UnsupportedSchema, match=r"older than this release reads \(2\): upgrade its sender"):
        control.check_schema(1, "the report", newest=3, oldest=2, upgrade="the server")


def test_a_job_asking_transcription_options_is_written_in_schema_2_and_others_in_1() -> None:
    # A worker of schema 1 would ignore the options, or hand "auto" to Whisper: it refuses the job.
    assert job_schema({"priority": "high", "model": "small", "language": "de"}) == 1
    assert job_schema({"language": "auto"}) == 2
    assert job_schema({"word_timestamps": True}) == 2
    check_job({"task_id": "t", "schema": 2})  # this release reads both
    with pytest.raises(UnsupportedSchema, match=r"schema 2, newer than this release reads \(1\)"):
        control.check_schema(job_schema({"vad": True}), "the task message", 1, 1, "this worker")
