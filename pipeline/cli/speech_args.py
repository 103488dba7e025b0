"""The transcription options of ``submit`` and ``run``: ``--language``, ``--task``, ``--word-timestamps``,
``--vad``, ``--prompt``, ``--max-words-per-cue`` (docs/transcripts.md).

A wrong value is refused by argparse with the reason ``speech_options`` gives,
before any file is sent.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from pipeline.processors.speech_options import TASKS, BadOption, SpeechOptions, check_language


def _checked(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def check(text: str) -> Any:
        try:
            return parse(text)
        except BadOption as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return check


def add_speech_options(parser: argparse.ArgumentParser) -> None:
    """Add the transcription options to a command's parser."""
    group = parser.add_argument_group("transcription")
    group.add_argument(
        "--language", type=_checked(check_language), metavar="CODE",
        help="the spoken language as a Whisper code (en, de, ...), or auto: detect it and record "
        "its probability (default: the worker's MORAG_WHISPER_LANGUAGE, else detected)",
    )  # fmt: skip
    group.add_argument(
        "--task", choices=TASKS, help="translate: transcribe into English (needs a multilingual model)"
    )
    group.add_argument(
        "--word-timestamps", action="store_true",
        help="every word with its start, end and probability; SRT and VTT get one cue per word group",
    )  # fmt: skip
    group.add_argument("--vad", action="store_true", help="skip what is not speech (Silero VAD)")
    group.add_argument("--prompt", help="an initial prompt: names, spellings, a style to follow")
    group.add_argument(
        "--max-words-per-cue", type=_checked(lambda text: SpeechOptions.parse({"max_words_per_cue": text})
                                              .max_words_per_cue),
        metavar="N", help="words per SRT/VTT cue with --word-timestamps (default 7)",
    )  # fmt: skip


def speech_options(args: argparse.Namespace) -> dict[str, Any]:
    """The transcription options ``args`` asks, as ``SubmitOptions`` takes them (None: not asked)."""
    return {
        "language": args.language,
        "task": args.task,
        "word_timestamps": args.word_timestamps or None,
        "vad": args.vad or None,
        "prompt": args.prompt,
        "max_words_per_cue": args.max_words_per_cue,
    }
