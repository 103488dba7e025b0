"""The server's task store on disk.

Layout under ``<data_dir>/files``::

    tasks/<task_id>/input/<name>     the uploaded file
    tasks/<task_id>/output/<name>    what the worker returned

Paths in messages are relative to the store root; ``resolve`` refuses any that
would leave it.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from pipeline.errors import BadInput
from pipeline.transfer.checksums import FileRef, sha256_file, verify

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(filename: str) -> str:
    """A file name safe to store: no folders, no leading dots, no odd characters."""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = _UNSAFE.sub("_", base).lstrip(".")
    return cleaned[:200] or "upload"


class LocalStore:
    """Task files under one root folder.

    Parameters:
      root: the folder holding ``tasks/``; created if missing.
    """

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        (self.root / "tasks").mkdir(parents=True, exist_ok=True)

    def resolve(self, relpath: str) -> Path:
        """The absolute path of a store path, refusing anything outside the store."""
        if not relpath or relpath.startswith("/") or "\x00" in relpath:
            raise BadInput(f"invalid store path {relpath!r}")
        path = (self.root / relpath).resolve()
        if not path.is_relative_to(self.root):
            raise BadInput(f"store path {relpath!r} leaves the store")
        return path

    @staticmethod
    def input_path(task_id: str, name: str) -> str:
        return f"tasks/{task_id}/input/{safe_name(name)}"

    @staticmethod
    def output_path(task_id: str, name: str) -> str:
        return f"tasks/{task_id}/output/{safe_name(name)}"

    def add_input(self, task_id: str, name: str, src: Path, sha256: str, size: int) -> FileRef:
        """Move an uploaded file into the task's input folder."""
        ref = FileRef(self.input_path(task_id, name), sha256, size)
        dest = self.resolve(ref.path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(src, dest)
        return ref

    def resolve_plain(self, relpath: str) -> Path:
        """``resolve``, refusing a path that passes through a symbolic link on its way.

        Its resolved path must be its own path with ``.`` and ``..`` worked out:
        a link, even one that points inside the store, would let a file stand
        for another task's.
        """
        path = self.resolve(relpath)
        if path != Path(os.path.abspath(self.root / relpath)):
            raise BadInput(f"store path {relpath!r} passes through a symbolic link")
        return path

    def check(self, ref: FileRef) -> None:
        """Hash the stored file; ChecksumMismatch unless it matches the reference.

        BadInput when the file is missing or reached through a symbolic link.
        """
        path = self.resolve_plain(ref.path)
        if not path.is_file():
            raise BadInput(f"{ref.path}: not in the store")
        verify(ref, sha256_file(path), path.stat().st_size)

    def task_dir(self, task_id: str) -> Path:
        return self.resolve(f"tasks/{task_id}")

    def remove_task(self, task_id: str) -> None:
        shutil.rmtree(self.task_dir(task_id), ignore_errors=True)

    def usage(self) -> tuple[int, int]:
        """(number of files, bytes) held by the store."""
        files = size = 0
        for folder, _, names in os.walk(self.root):
            for name in names:
                try:
                    size += os.stat(os.path.join(folder, name)).st_size
                    files += 1
                except FileNotFoundError:
                    continue
        return files, size
