"""The one rule for a task's output files: where they lie and what they are called.

A worker names the outputs of ``talk.mp4`` ``talk.json``, ``talk.srt``, ...
(``output_name``: the stem and the format's extension, which is its name but for
``morag``, MoRAG's Markdown, whose files end in ``.morag.md``) and uploads them
to ``tasks/<task_id>/output/``. The server accepts a completion only when every
output it reports is a file directly in that task's output folder, with a safe
name whose extension is the output's format's and a format the task's kind
produces (``check_outputs``). The CLI checks a task's outputs with the same
function before it writes any of them into ``--output``, so a name like
``.bashrc`` or ``../x`` is never written.

A safe name holds only ``A-Z a-z 0-9 . _ -``, starts with a letter, a digit
or ``_``, and has at most ``NAME_MAX`` characters.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from typing import Any

from pipeline.errors import BadInput
from pipeline.kinds import KINDS

#: The formats each kind of task produces (with a file handed on to the next stage, where it may).
FORMATS_BY_KIND: dict[str, tuple[str, ...]] = {kind.name: kind.outputs for kind in KINDS.values()}

#: The extension of each format whose extension is not its name.
EXTENSIONS = {"morag": "morag.md"}


def extension(fmt: str) -> str:
    """The extension of a format's files, without its dot: the format's name but for ``EXTENSIONS``."""
    return EXTENSIONS.get(fmt, fmt)


#: The longest output name, extension included.
NAME_MAX = 128
#: The longest stem: room is left for the longest extension.
STEM_MAX = NAME_MAX - 1 - max(len(extension(f)) for formats in FORMATS_BY_KIND.values() for f in formats)

_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_SAFE_ID = re.compile(r"[A-Za-z0-9_-]+")
_UNSAFE_RUN = re.compile(r"[^A-Za-z0-9._-]+")


class UnsafeOutput(BadInput):
    """An output lies outside its task's output folder, or its name or format breaks the rule."""


def output_folder(task_id: str) -> str:
    """The store folder of a task's outputs, with its trailing slash."""
    return f"tasks/{task_id}/output/"


def output_stem(filename: str) -> str:
    """A safe stem for the outputs of an input called ``filename``.

    Folders are dropped (``../../x.mp3`` gives ``x``), accents are folded to
    ASCII, runs of other characters become ``_``, leading dots, dashes and
    underscores go (``.bashrc.mp4`` gives ``bashrc``), and the stem is cut to
    ``STEM_MAX`` characters; ``output`` when nothing is left.
    """
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    stem = base.rsplit(".", 1)[0] if "." in base.lstrip(".") else base
    ascii_only = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode("ascii")
    cleaned = _UNSAFE_RUN.sub("_", ascii_only).lstrip("._-")[:STEM_MAX].rstrip(".")
    return cleaned or "output"


def output_name(filename: str, fmt: str) -> str:
    """The name of the ``fmt`` output of an input called ``filename``: ``<safe stem>.<extension>``."""
    name = f"{output_stem(filename)}.{extension(fmt)}"
    check_name(name, fmt)
    return name


def check_name(name: str, fmt: str) -> None:
    """Raise UnsafeOutput unless ``name`` is a safe file name ending in ``fmt``'s extension."""
    if len(name) > NAME_MAX:
        raise UnsafeOutput(f"output name {name[:40]!r}… is longer than {NAME_MAX} characters")
    if not _SAFE_NAME.fullmatch(name):
        raise UnsafeOutput(
            f"output name {name!r} is unsafe: only A-Z a-z 0-9 . _ - are allowed,"
            " and it must start with a letter, a digit or _"
        )
    if not name.endswith(f".{extension(fmt)}"):
        raise UnsafeOutput(f"output name {name!r} does not end in .{extension(fmt)}, its format's extension")


def formats_of(kind: str) -> tuple[str, ...]:
    """The formats a task of ``kind`` produces; UnsafeOutput for a kind that produces none."""
    try:
        return FORMATS_BY_KIND[kind]
    except KeyError:
        raise UnsafeOutput(f"tasks of kind {kind!r} have no output formats") from None


def check_output(task_id: str, kind: str, output: Any) -> dict[str, Any]:
    """The reference ``output`` stands for, reduced to path, sha256, size and format.

    Raises UnsafeOutput unless the path is ``tasks/<task_id>/output/<name>``
    with a safe name (``check_name``) whose extension is the output's format,
    and that format is one the task's kind produces. The file itself (its
    checksum, a symbolic link on its way) is the store's to check.
    """
    if not isinstance(output, Mapping):
        raise UnsafeOutput(f"an output is not an object: {str(output)[:60]!r}")
    path, fmt, sha256, size = (output.get(k) for k in ("path", "format", "sha256", "size"))
    if not isinstance(path, str) or not isinstance(fmt, str):
        raise UnsafeOutput(f"an output has no path or no format: {str(dict(output))[:80]!r}")
    if not isinstance(sha256, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise UnsafeOutput(f"{path!r}: no valid sha256 and size")
    if not _SAFE_ID.fullmatch(task_id):
        raise UnsafeOutput(f"task id {task_id!r} is unsafe")
    folder = output_folder(task_id)
    name = path[len(folder) :]
    if not path.startswith(folder) or "/" in name:
        raise UnsafeOutput(f"{path!r} is not a file in this task's output folder {folder}")
    check_name(name, fmt)
    formats = formats_of(kind)
    if fmt not in formats:
        raise UnsafeOutput(f"{path!r}: format {fmt!r} is not one of {kind} outputs ({', '.join(formats)})")
    return {"path": path, "sha256": sha256, "size": size, "format": fmt}


def check_outputs(task_id: str, kind: str, outputs: Any) -> list[dict[str, Any]]:
    """Every output of a completion checked by ``check_output``, each format at most once."""
    if not isinstance(outputs, list):
        raise UnsafeOutput(f"the outputs are not a list: {str(outputs)[:60]!r}")
    checked = [check_output(task_id, kind, output) for output in outputs]
    seen: set[str] = set()
    for output in checked:
        if output["format"] in seen:
            raise UnsafeOutput(f"{output['path']!r}: a second {output['format']} output")
        seen.add(output["format"])
    return checked
