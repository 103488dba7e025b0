"""Outputs lie in their own task's output folder, with safe names, on the server and in the CLI.

A compromised worker reports another task's file (its checksum matches), a
name like ``.bashrc``, ``../x`` or ``a/b``, or a file reached through a
symbolic link: the server fails the task with the reason and serves nothing.
Input names like ``../../x.mp3`` or ``.bashrc.mp4`` give outputs with safe
names, which the server accepts. The CLI writes only such names, inside
``--output``, and never through a symbolic link.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import dramatiq
import pytest

from pipeline.cli import display
from pipeline.errors import BadInput
from pipeline.outputs import NAME_MAX, UnsafeOutput, check_outputs, output_folder, output_name
from pipeline.services import Services, get_services
from pipeline.store import State, Task, TaskStore, new_task_id
from pipeline.transfer.checksums import sha256_file
from tests.conftest import Stack, wait_for


@pytest.fixture
def services(stub_broker) -> Services:  # type: ignore[no-untyped-def]
    return get_services()


def make(services: Services, kind: str = "convert", filename: str = "a.md") -> Task:
    task = Task(new_task_id(), kind, State.queued, filename, {"path": "x"}, {}, {"queue": "cpu"})
    services.store.create(task)
    services.store.mark_running(task.id, "w1", 1)
    return task


def plant(services: Services, path: str, content: bytes = b"# A\n", fmt: str = "md") -> dict[str, Any]:
    """A file in the store, and the reference a worker would report for it."""
    local = services.files.root / path
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_bytes(content)
    return {"path": path, "sha256": hashlib.sha256(content).hexdigest(), "size": len(content), "format": fmt}


def complete(task: Task, outputs: list[Any]) -> Task:
    from pipeline.actors.control import task_completed

    task_completed.fn(task.id, outputs, {}, "liar", time.time())
    return get_services().store.get(task.id)


# The server: what a compromised worker reports.


def test_another_tasks_file_with_a_matching_checksum_is_refused(services: Services) -> None:
    victim = make(services)
    theirs = plant(services, f"tasks/{victim.id}/output/a.md", b"# their secret\n")
    their_input = plant(services, f"tasks/{victim.id}/input/a.md", b"# their upload\n")
    for stolen in (theirs, their_input):
        attacker = make(services)
        failed = complete(attacker, [stolen])
        assert failed.state == State.failed and failed.outputs == []
        assert failed.error == (
            f"output failed verification: {stolen['path']!r} is not a file in this task's output"
            f" folder tasks/{attacker.id}/output/"
        )
    victim_now = services.store.get(victim.id)
    assert victim_now.state == State.running
    assert (services.files.root / theirs["path"]).read_bytes() == b"# their secret\n"


HOSTILE = [
    # (what the worker reports, where the file really is, the reason given)
    (".bashrc", "output/.bashrc", "output name '.bashrc' is unsafe"),
    (".manifest.json", "output/.manifest.json", "output name '.manifest.json' is unsafe"),
    ("../x", "x", "is not a file in this task's output folder"),
    ("a/b", "output/a/b", "is not a file in this task's output folder"),
    ("../../other/output/a.md", "../other/output/a.md", "is not a file in this task's output folder"),
    ("run.sh", "output/run.sh", "does not end in .md"),
    ("a b.md", "output/a b.md", "output name 'a b.md' is unsafe"),
    ("-rf.md", "output/-rf.md", "output name '-rf.md' is unsafe"),
    ("x" * NAME_MAX + ".md", "output/" + "x" * NAME_MAX + ".md", f"longer than {NAME_MAX} characters"),
]  # fmt: skip


@pytest.mark.parametrize(("reported", "real", "reason"), HOSTILE, ids=[h[0][:20] for h in HOSTILE])
def test_hostile_output_names_fail_the_task(
    services: Services, reported: str, real: str, reason: str
) -> None:
    task = make(services)
    output = plant(services, f"tasks/{task.id}/{real}")  # the file is there, its checksum matches
    output["path"] = f"tasks/{task.id}/output/{reported}"
    failed = complete(task, [output])
    assert failed.state == State.failed and failed.outputs == []
    assert failed.error.startswith("output failed verification: ") and reason in failed.error


@pytest.mark.parametrize(
    ("outputs", "reason"),
    [
        ([{"path": "tasks/T/output/a.md", "sha256": "0" * 64, "size": 4, "format": "json"}],
         "output name 'a.md' does not end in .json"),
        ([{"path": "tasks/T/output/a.exe", "sha256": "0" * 64, "size": 4, "format": "exe"}],
         "format 'exe' is not one of convert outputs (md, json)"),
        ([{"path": "tasks/T/output/a.md", "format": "md"}], "no valid sha256 and size"),
        (["tasks/T/output/a.md"], "an output is not an object"),
        ({"path": "tasks/T/output/a.md"}, "the outputs are not a list"),
    ],
    ids=["format and name differ", "foreign format", "no checksum", "not an object", "not a list"],
)  # fmt: skip
def test_malformed_outputs_fail_the_task(services: Services, outputs: Any, reason: str) -> None:
    task = make(services)
    text = json.dumps(outputs).replace("tasks/T/", f"tasks/{task.id}/")
    failed = complete(task, json.loads(text))
    assert failed.state == State.failed and reason in failed.error, failed.error


def test_a_second_output_of_one_format_fails_the_task(services: Services) -> None:
    task = make(services)
    first = plant(services, f"tasks/{task.id}/output/a.md")
    second = plant(services, f"tasks/{task.id}/output/b.md")
    failed = complete(task, [first, second])
    assert failed.state == State.failed and "a second md output" in failed.error


def test_files_reached_through_a_symbolic_link_are_refused(services: Services) -> None:
    victim = make(services)
    theirs = plant(services, f"tasks/{victim.id}/output/a.md", b"# their secret\n")

    linked_file = make(services)
    link = services.files.root / f"tasks/{linked_file.id}/output/a.md"
    link.parent.mkdir(parents=True)
    link.symlink_to(services.files.root / theirs["path"])
    failed = complete(linked_file, [{**theirs, "path": f"tasks/{linked_file.id}/output/a.md"}])
    assert failed.state == State.failed and "passes through a symbolic link" in failed.error

    linked_folder = make(services)
    folder = services.files.root / f"tasks/{linked_folder.id}/output"
    folder.parent.mkdir(parents=True)
    folder.symlink_to(services.files.root / f"tasks/{victim.id}/output", target_is_directory=True)
    failed = complete(linked_folder, [{**theirs, "path": f"tasks/{linked_folder.id}/output/a.md"}])
    assert failed.state == State.failed and "passes through a symbolic link" in failed.error

    # A late completion of a canceled task removes its outputs, never what a link points to.
    services.store.mark_canceled(linked_folder.id, "canceled by the user")
    complete(linked_folder, [])
    assert (services.files.root / theirs["path"]).read_bytes() == b"# their secret\n"


# The worker: names made from hostile input names are safe, and the server accepts them.

INPUT_NAMES = [
    ("transcribe", "../../x.mp3", "x"),
    ("transcribe", ".bashrc.mp4", "bashrc"),
    ("convert", "a b$c.docx", "a_b_c"),
    ("convert", "..\\..\\evil.html", "evil"),
    ("transcribe", "Vortrag über KI.mp4", "Vortrag_uber_KI"),
    ("transcribe", "录音.mp3", "output"),
    ("convert", "y" * 300 + ".docx", "y" * (NAME_MAX - 5)),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "filename", "stem"), INPUT_NAMES, ids=[n[1][:20] for n in INPUT_NAMES])
def test_outputs_named_after_hostile_inputs_are_safe_and_accepted(
    services: Services, kind: str, filename: str, stem: str
) -> None:
    task = make(services, kind, filename)
    formats = ("json", "srt", "vtt", "txt", "md") if kind == "transcribe" else ("md", "json")
    outputs = []
    for fmt in formats:
        name = output_name(filename, fmt)
        assert name == f"{stem}.{fmt}" or (stem == "y" * (NAME_MAX - 5) and name.startswith(stem[:100]))
        assert len(name) <= NAME_MAX
        outputs.append(plant(services, output_folder(task.id) + name, f"out {fmt}".encode(), fmt))
    done = complete(task, outputs)
    assert done.state == State.done, done.error
    assert [o["path"].rsplit("/", 1)[-1] for o in done.outputs] == [output_name(filename, f) for f in formats]


# The CLI: ``--output DIR`` writes only safe names, inside DIR, through no link.


def cli_task(names: list[str], task_id: str = "t1") -> tuple[dict[str, Any], dict[str, bytes]]:
    outputs, contents = [], {}
    for name in names:
        fmt = name.rsplit(".", 1)[-1] if name.endswith((".srt", ".txt")) else "txt"
        content = f"content of {name}".encode()
        contents[fmt] = content
        outputs.append({"path": f"tasks/{task_id}/output/{name}", "format": fmt,
                        "sha256": hashlib.sha256(content).hexdigest(), "size": len(content)})  # fmt: skip
    task = {"id": task_id, "kind": "transcribe", "state": "done", "filename": "talk.mp4", "outputs": outputs}
    return task, contents


@pytest.mark.parametrize("hostile", [".bashrc", "../x.txt", "a/b.txt", "../../t1/output/.profile"])
def test_cli_refuses_hostile_names_and_writes_nothing(tmp_path: Path, hostile: str) -> None:
    home = tmp_path / "home"
    out = home / "out"
    task, contents = cli_task(["talk.srt", hostile])
    with pytest.raises(UnsafeOutput, match="unsafe|not a file in this task's output folder"):
        display.write_outputs(task, lambda t, fmt: contents[fmt], out)
    assert not [p for p in home.rglob("*") if p.is_file()]  # not even talk.srt


def test_cli_never_writes_through_a_symbolic_link(tmp_path: Path) -> None:
    precious = tmp_path / ".bashrc"
    precious.write_text("export PATH=/usr/bin\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "talk.txt").symlink_to(precious)
    task, contents = cli_task(["talk.srt", "talk.txt"])
    with pytest.raises(
        UnsafeOutput, match=r"talk.txt: a symbolic link or not a regular file; nothing written"
    ):
        display.write_outputs(task, lambda t, fmt: contents[fmt], out)
    assert precious.read_text() == "export PATH=/usr/bin\n"
    assert sorted(p.name for p in out.iterdir()) == ["talk.txt"]  # the link, and nothing else


def test_cli_writes_safe_names_inside_the_folder(tmp_path: Path) -> None:
    task, contents = cli_task(["talk.srt", "talk.txt"])
    (tmp_path / "talk.txt").write_text("an older result")
    written = display.write_outputs(task, lambda t, fmt: contents[fmt], tmp_path)
    assert written == [tmp_path / "talk.srt", tmp_path / "talk.txt"]
    assert (tmp_path / "talk.txt").read_bytes() == contents["txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["talk.srt", "talk.txt"]  # no partial file left


def test_one_rule_for_server_and_cli() -> None:
    task, _ = cli_task(["talk.srt", "talk.txt"])
    assert check_outputs("t1", "transcribe", task["outputs"]) == task["outputs"]
    assert issubclass(UnsafeOutput, BadInput)  # a completion breaking it fails at once, never retried


# The real stack: a worker over SFTP, signed completions over RabbitMQ, the CLI.


def audit_events(stack: Stack) -> list[dict[str, Any]]:
    path = stack.data_dir / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def ended(stack: Stack, task_id: str) -> dict[str, Any] | None:
    task = stack.get(f"/api/v1/tasks/{task_id}").json()
    return task if task["state"] in ("done", "failed", "canceled") else None


def upload(stack: Stack, path: Path, name: str) -> dict[str, Any]:
    with path.open("rb") as f:
        response = stack.post("/api/v1/tasks", files={"file": (name, f)})
    assert response.status_code in (200, 201, 202), response.text
    return response.json()


@pytest.mark.rabbitmq
@pytest.mark.slow
def test_real_stack_confines_outputs(stack: Stack, samples: Path, tmp_path: Path) -> None:
    from pipeline.brokers.rabbitmq import build_rabbitmq_broker
    from pipeline.config import Settings
    from pipeline.security import signatures

    stack.start_server()
    # An enrolled worker over SFTP converts a document uploaded under a hostile name.
    stack.start_worker("cpu", name="cpu-box-1")
    stack.wait_consumers("cpu")
    task = upload(stack, samples / "report.html", ".bashrc x$y.html")
    done = wait_for("the conversion", lambda: ended(stack, task["id"]), stack=stack)
    assert done["state"] == "done", done["error"]
    names = sorted(o["path"].rsplit("/", 1)[-1] for o in done["outputs"])
    assert names[0].startswith("bashrc_x_y.") and all(n.startswith("bashrc_x_y.") for n in names)
    home = tmp_path / "home"
    proc = stack.cli("result", task["id"], "--output", str(home / "out"), HOME=str(home))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.relative_to(home).as_posix() for p in home.rglob("*") if p.is_file()) == [
        f"out/{n}" for n in names
    ]

    # A compromised worker (a valid token, a valid signature) reports files it must not.
    stack.stop("cpu-box-1")
    bundle = stack.enroll("cpu-box-2", "cpu")
    token, key = bundle["MORAG_WORKER_TOKEN"], bundle["MORAG_WORKER_KEY"]
    import jwt

    token_id = jwt.decode(token, options={"verify_signature": False})["jti"]
    settings = Settings(broker_url=stack.env["MORAG_BROKER_URL"])
    files = stack.data_dir / "files"
    victim_output = done["outputs"][0]
    cases = {
        "another task's output": lambda t: victim_output,
        ".bashrc": lambda t: planted(files, f"tasks/{t}/output/.bashrc", "md"),
        "../x": lambda t: planted(files, f"tasks/{t}/x", "md", f"tasks/{t}/output/../x"),
        "a/b": lambda t: planted(files, f"tasks/{t}/output/a/b", "md"),
    }
    attacked = {}
    broker = build_rabbitmq_broker(settings)
    try:
        for case, report in cases.items():
            target = upload(stack, samples / "report.html", "report.html")["id"]
            kwargs = {"task_id": target, "outputs": [report(target)], "result": {}, "worker": "cpu-box-2",
                      "ts": time.time()}  # fmt: skip
            block = signatures.sign("task_completed", [], kwargs, token_id, key)
            broker.enqueue(
                dramatiq.Message("control", "task_completed", (), kwargs, {signatures.OPTION: block})
            )
            attacked[case] = target
    finally:
        broker.close()
    for case, target in attacked.items():
        failed = wait_for(case, lambda t=target: ended(stack, t), stack=stack)
        assert failed["state"] == "failed", (case, failed)
        assert failed["error"].startswith("output failed verification: "), (case, failed["error"])
        assert failed["outputs"] == []
        assert stack.get(f"/api/v1/tasks/{target}/result").status_code == 409
    refused = [e for e in audit_events(stack) if e["event"] == "output.refused"]
    assert sorted(e["task"] for e in refused) == sorted(attacked.values())
    assert stack.get(f"/api/v1/tasks/{task['id']}").json()["state"] == "done"  # the victim is untouched

    # A record holding a hostile name (one written before this rule): the CLI refuses it and writes
    # nothing, though the server serves the file.
    old = upload(stack, samples / "report.html", "report.html")["id"]
    hostile = planted(files, f"tasks/{old}/output/.bashrc", "md")
    assert TaskStore(stack.data_dir / "tasks.db").mark_done(old, [hostile], {}, "old-worker")
    proc = stack.cli("result", old, "--output", str(home), HOME=str(home))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "report.html: done, but its output: output name '.bashrc' is unsafe: only A-Z a-z 0-9 . _ -"
        " are allowed, and it must start with a letter, a digit or _"
    ), proc.stderr
    assert not (home / ".bashrc").exists()


def planted(files: Path, real: str, fmt: str, reported: str | None = None) -> dict[str, Any]:
    """A file put in the server's store as a worker with shell access to it might; its reference."""
    path = files / real
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"planted {os.path.basename(real)}\n")
    return {"path": reported or real, "sha256": sha256_file(path), "size": path.stat().st_size, "format": fmt}
