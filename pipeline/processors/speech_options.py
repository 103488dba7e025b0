"""What a user may ask of a transcription, checked before a task is made and again on the worker.

The options travel in the task message's ``options`` (``task_message.build_job``)
under these keys, each absent when it was not asked, so that a task without
them carries the same message as before:

``language``
    a Whisper language code (``LANGUAGES``), or ``auto``: detect it, even on a
    worker whose ``MORAG_WHISPER_LANGUAGE`` names one. The detected language and
    its probability go into the outputs and the task's result.
``task``
    ``translate``: transcribe into English (a multilingual model only).
``word_timestamps``
    true: each segment carries its words with start, end and probability.
``vad``
    true: faster-whisper's Silero VAD (its model ships in the package) skips
    what is not speech.
``prompt``
    the initial prompt: names, spellings, a style to follow.
``temperature``
    0 to 1; above 0 decodes at that temperature alone, 0 (or absent) uses
    faster-whisper's fallback schedule, as OpenAI's API does.
``max_words_per_cue``
    the most words in one SRT or VTT cue when word timestamps are asked.

Nothing here imports faster-whisper: the server checks options without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from pipeline.errors import BadInput

#: Whisper's languages, code to name (faster-whisper's tokenizer knows the same codes;
#: tests/unit/test_speech_options.py compares them).
LANGUAGES: dict[str, str] = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian",
    "ko": "korean", "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish",
    "pl": "polish", "ca": "catalan", "nl": "dutch", "ar": "arabic", "sv": "swedish",
    "it": "italian", "id": "indonesian", "hi": "hindi", "fi": "finnish", "vi": "vietnamese",
    "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay", "cs": "czech",
    "ro": "romanian", "da": "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian",
    "th": "thai", "ur": "urdu", "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian",
    "la": "latin", "mi": "maori", "ml": "malayalam", "cy": "welsh", "sk": "slovak",
    "te": "telugu", "fa": "persian", "lv": "latvian", "bn": "bengali", "sr": "serbian",
    "az": "azerbaijani", "sl": "slovenian", "kn": "kannada", "et": "estonian", "mk": "macedonian",
    "br": "breton", "eu": "basque", "is": "icelandic", "hy": "armenian", "ne": "nepali",
    "mn": "mongolian", "bs": "bosnian", "kk": "kazakh", "sq": "albanian", "sw": "swahili",
    "gl": "galician", "mr": "marathi", "pa": "punjabi", "si": "sinhala", "km": "khmer",
    "sn": "shona", "yo": "yoruba", "so": "somali", "af": "afrikaans", "oc": "occitan",
    "ka": "georgian", "be": "belarusian", "tg": "tajik", "sd": "sindhi", "gu": "gujarati",
    "am": "amharic", "yi": "yiddish", "lo": "lao", "uz": "uzbek", "fo": "faroese",
    "ht": "haitian creole", "ps": "pashto", "tk": "turkmen", "nn": "nynorsk", "mt": "maltese",
    "sa": "sanskrit", "lb": "luxembourgish", "my": "myanmar", "bo": "tibetan", "tl": "tagalog",
    "mg": "malagasy", "as": "assamese", "tt": "tatar", "haw": "hawaiian", "ln": "lingala",
    "ha": "hausa", "ba": "bashkir", "jw": "javanese", "su": "sundanese", "yue": "cantonese",
}  # fmt: skip

AUTO = "auto"
#: Whisper's own ``task`` argument. Its "transcribe" is Whisper's word, not the kind of that name
#: (``pipeline.kinds``); modules name it through TRANSCRIBE_TASK.
TASKS = TRANSCRIBE_TASK, TRANSLATE_TASK = ("transcribe", "translate")
DEFAULT_WORDS_PER_CUE = 7
MAX_WORDS_PER_CUE = 50
MAX_PROMPT_CHARS = 1000
#: The keys of a task's options that belong to the transcription.
KEYS = ("language", "task", "word_timestamps", "vad", "prompt", "temperature", "max_words_per_cue")

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", ""}


class BadOption(BadInput):
    """A transcription option that cannot be honoured; the message says which and why.

    Parameters:
      message: the reason.
      option: the option at fault (``model`` when the model cannot do what is asked).
    """

    def __init__(self, message: str, option: str) -> None:
        super().__init__(message)
        self.option = option


def english_only(model: str) -> bool:
    """Whether a model name (or folder) names an English-only Whisper model: ``*.en``."""
    return PurePath(model.rstrip("/")).name.endswith(".en")


@dataclass(frozen=True)
class SpeechOptions:
    """A transcription's options, checked (see the module's docstring for each).

    Parameters:
      language: a code of ``LANGUAGES``, ``auto``, or None (the worker's default).
      task: transcribe or translate.
      word_timestamps: words with their times and probabilities.
      vad: skip what is not speech.
      prompt: the initial prompt.
      temperature: above 0: decode at it; None: the fallback schedule.
      max_words_per_cue: words per SRT/VTT cue when word timestamps are asked.
    """

    language: str | None = None
    task: str = TRANSCRIBE_TASK
    word_timestamps: bool = False
    vad: bool = False
    prompt: str | None = None
    temperature: float | None = None
    max_words_per_cue: int = DEFAULT_WORDS_PER_CUE

    @classmethod
    def parse(cls, options: Mapping[str, Any]) -> SpeechOptions:
        """The options among ``options`` (values as a form sends them, or typed); BadOption when one is
        wrong. Keys that are not transcription options are left alone."""
        temperature = _number(options.get("temperature"), "temperature", float)
        if temperature is not None and not 0 <= temperature <= 1:
            raise BadOption(f"temperature must be between 0 and 1, not {temperature:g}", "temperature")
        words = _number(options.get("max_words_per_cue"), "max_words_per_cue", int)
        if words is not None and not 1 <= words <= MAX_WORDS_PER_CUE:
            raise BadOption(
                f"max_words_per_cue must be between 1 and {MAX_WORDS_PER_CUE}, not {words}",
                "max_words_per_cue",
            )
        prompt = options.get("prompt") or None
        if prompt is not None and len(str(prompt)) > MAX_PROMPT_CHARS:
            raise BadOption(f"the prompt is longer than {MAX_PROMPT_CHARS} characters", "prompt")
        return cls(
            language=check_language(options.get("language")),
            task=_task(options.get("task")),
            word_timestamps=_flag(options.get("word_timestamps"), "word_timestamps"),
            vad=_flag(options.get("vad"), "vad"),
            prompt=str(prompt) if prompt is not None else None,
            temperature=temperature or None,
            max_words_per_cue=words or DEFAULT_WORDS_PER_CUE,
        )

    def to_options(self) -> dict[str, Any]:
        """The options as a task message carries them: only those asked."""
        found = {
            "language": self.language,
            "task": self.task if self.task != TRANSCRIBE_TASK else None,
            "word_timestamps": self.word_timestamps or None,
            "vad": self.vad or None,
            "prompt": self.prompt,
            "temperature": self.temperature,
            "max_words_per_cue": self.max_words_per_cue if self.max_words_per_cue != DEFAULT_WORDS_PER_CUE
            else None,
        }  # fmt: skip
        return {k: v for k, v in found.items() if v is not None}

    def check_model(self, model: str, english: bool | None = None) -> None:
        """BadOption when ``model`` cannot do what is asked: translate, or hear a language other
        than English, with an English-only model. ``english``: whether it is English-only (None:
        judged by its name, ``english_only``; a worker knows it from the loaded model)."""
        if not (english_only(model) if english is None else english):
            return
        if self.task == "translate":
            raise BadOption(
                f"model {model} is English-only: it cannot translate. Translation needs a "
                "multilingual model (tiny, base, small, medium, large-v3) allowed by the server "
                "(MORAG_WHISPER_ALLOWED_MODELS)",
                "model",
            )
        if self.language not in (None, AUTO, "en"):
            name = LANGUAGES.get(self.language, self.language)  # a worker's own default may be anything
            raise BadOption(
                f"model {model} is English-only: it cannot transcribe {name}"
                f" ({self.language}); use a multilingual model, or the language en or auto",
                "language",
            )

    def language_for(self, default: str | None) -> str | None:
        """The language to give Whisper: None to detect it. ``default`` is the worker's own."""
        if self.language == AUTO:
            return None
        return self.language or default


def check_language(value: Any) -> str | None:
    """A language code of ``LANGUAGES``, ``auto`` or None; BadOption for anything else, naming the
    code of a language given by its name."""
    if value is None or value == "":
        return None
    text = str(value).strip().lower()
    if text == AUTO or text in LANGUAGES:
        return text
    named = [code for code, name in LANGUAGES.items() if name == text]
    hint = f"; {text} is {named[0]!r}" if named else "; e.g. en, de, fr, es, zh"
    raise BadOption(f"unknown language {value!r}: give auto or a Whisper language code{hint}", "language")


def _task(value: Any) -> str:
    text = str(value or TRANSCRIBE_TASK).strip().lower()
    if text not in TASKS:
        raise BadOption(f"task must be transcribe or translate, not {value!r}", "task")
    return text


def _flag(value: Any, name: str) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise BadOption(f"{name} must be true or false, not {value!r}", name)


def _number(value: Any, name: str, kind: type) -> Any:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise BadOption(f"{name} must be a number, not {value!r}", name)
    try:
        return kind(value)
    except (TypeError, ValueError):
        what = "an integer" if kind is int else "a number"
        raise BadOption(f"{name} must be {what}, not {value!r}", name) from None
