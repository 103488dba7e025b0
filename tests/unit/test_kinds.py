"""The kind registry (pipeline/kinds.py) is the one place a kind is defined, and every part of the
pipeline reads what its records say: actor, queues, estimate, runner, formats and limits."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipeline.api.tasks import upload_limits
from pipeline.config import Settings
from pipeline.kinds import HANDOFF, KINDS, Kind, actors_on, runs_on
from pipeline.outputs import UnsafeOutput, check_outputs, extension
from pipeline.routing import Classification, choose_route, kind_of_head
from pipeline.services import build_services
from tests.conftest import TEST_SECRET

PIPELINE = Path(__file__).resolve().parents[2] / "pipeline"
#: Every name by which a kind could be spelt: its own and its actor's.
SPELLINGS = {name for kind in KINDS.values() for name in (kind.name, kind.actor)}


def _spelt(path: Path) -> list[str]:
    """The string constants of a module that spell a kind (docstrings aside), with their lines."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        f"{path.name}:{node.lineno}: {node.value!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value in SPELLINGS and id(node) not in docstrings
    ]


def test_no_module_but_the_registry_spells_a_kind_or_its_actor() -> None:
    # speech_options.py spells Whisper's own task argument ("transcribe" or "translate"), once.
    elsewhere = {PIPELINE / "kinds.py", PIPELINE / "processors" / "speech_options.py"}
    modules = [p for p in PIPELINE.rglob("*.py") if p not in elsewhere and "migrations" not in p.parts]
    assert len(modules) > 50
    assert [f"{path.parent.name}/{hit}" for path in modules for hit in _spelt(path)] == []


def test_the_check_finds_a_kind_spelt_outside_the_registry(tmp_path: Path) -> None:
    stray = tmp_path / "stray.py"
    stray.write_text('"""Docstring naming transcribe is fine."""\nKIND = "convert"\nACTOR = f"{KIND}"\n')
    assert _spelt(stray) == ["stray.py:2: 'convert'"]


@pytest.mark.parametrize("kind", KINDS.values(), ids=list(KINDS))
def test_each_record_is_complete_and_its_runner_imports(kind: Kind) -> None:
    assert set(kind.queues) <= {"gpu", "cpu"} and kind.queues
    assert kind.fallback == (kind.prefers_gpu and "cpu" in kind.queues)
    assert kind.size_limit in Settings.model_fields
    assert callable(kind.run())
    estimate = kind.estimate(
        Classification(kind.name, "x", "x/x", 10_000, duration=60.0, pages=3), Settings()
    )
    assert set(estimate) == {f"{queue}_s" for queue in kind.queues}


@pytest.mark.parametrize("kind", KINDS.values(), ids=list(KINDS))
def test_routing_sends_each_kind_only_to_its_queues(kind: Kind) -> None:
    found = Classification(kind.name, "x", "x/x", 10_000, duration=30.0, pages=2)
    assert choose_route(found, Settings(), gpu_workers=1).queue == kind.queues[0]
    assert choose_route(found, Settings(), gpu_workers=0).queue in kind.queues
    assert choose_route(found, Settings(), gpu="never").queue == "cpu"


def test_each_queue_registers_the_actors_of_the_kinds_it_runs(stub_broker) -> None:  # type: ignore[no-untyped-def]
    from pipeline.actors import cpu, gpu

    assert set(gpu.actors) == {k.name for k in runs_on("gpu")}
    assert set(cpu.actors) == set(KINDS)
    for name, actor in cpu.actors.items():
        assert actor.actor_name == KINDS[name].actor and actor.queue_name == KINDS[name].queues[0]
        assert actor.options.get("gpu_fallback", False) == KINDS[name].fallback
    assert actors_on("gpu") == {"transcribe", "read_image"}
    assert actors_on("cpu") == {kind.actor for kind in KINDS.values()}


@pytest.mark.parametrize("kind", KINDS.values(), ids=list(KINDS))
def test_a_completion_may_report_the_formats_of_its_kind_and_no_other(kind: Kind) -> None:
    def output(fmt: str) -> dict:
        path = f"tasks/t1/output/talk.{extension(fmt)}"
        return {"path": path, "format": fmt, "sha256": "0" * 64, "size": 1}

    assert [o["format"] for o in check_outputs("t1", kind.name, [output(f) for f in kind.outputs])] == list(
        kind.outputs
    )
    assert (HANDOFF in kind.outputs) == kind.hands_off
    for other in {f for k in KINDS.values() for f in k.outputs} - set(kind.outputs):
        with pytest.raises(UnsafeOutput, match=f"not one of {kind.name} outputs"):
            check_outputs("t1", kind.name, [output(other)])


def test_each_kind_is_bounded_by_its_own_size_setting(tmp_path: Path) -> None:
    sizes = {"max_upload_mb": 5, "max_document_mb": 3, "max_image_mb": 2, "fetch_max_mb": 7}
    settings = Settings(data_dir=tmp_path, secret_key=TEST_SECRET, **sizes)
    assert {kind.size_limit for kind in KINDS.values()} == set(sizes)
    for kind in KINDS.values():
        assert kind.max_bytes(settings) == sizes[kind.size_limit] * 1024 * 1024
        assert kind.too_large(kind.max_bytes(settings), settings) is None
        refusal = kind.too_large(kind.max_bytes(settings) + 1, settings)
        assert refusal == (
            f"larger than the {sizes[kind.size_limit]} MiB allowed for {kind.accepts}"
            f" (MORAG_{kind.size_limit.upper()})"
        )
    limits = upload_limits(build_services(settings))
    heads = {
        "image": b"\x89PNG\r\n\x1a\n" + b"\0" * 8,
        "convert": b"%PDF-1.7\n",
        "transcribe": b"ID3\x04\0\0",
    }
    for name, head in heads.items():
        assert kind_of_head(head) is KINDS[name]
        assert limits.for_head(head) == (KINDS[name].max_bytes(settings), KINDS[name].accepts)
