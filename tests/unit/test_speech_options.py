"""Transcription options: checked with a reason, carried only when asked."""

from __future__ import annotations

import pytest

from pipeline.processors.speech_options import LANGUAGES, BadOption, SpeechOptions

CODE = "give auto or a Whisper language code"


def test_the_language_codes_are_faster_whispers() -> None:
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    assert set(LANGUAGES) == set(_LANGUAGE_CODES)


def test_options_from_a_form_are_typed_and_only_those_asked_are_carried() -> None:
    form = {"language": "AUTO", "word_timestamps": "true", "vad": "false", "prompt": "", "temperature": "0.4",
            "max_words_per_cue": "3", "priority": "high"}  # fmt: skip
    options = SpeechOptions.parse(form)
    assert options == SpeechOptions("auto", word_timestamps=True, temperature=0.4, max_words_per_cue=3)
    assert options.to_options() == {"language": "auto", "word_timestamps": True, "temperature": 0.4,
                                    "max_words_per_cue": 3}  # fmt: skip
    assert SpeechOptions.parse({}).to_options() == {}
    assert SpeechOptions.parse({"temperature": "0"}).temperature is None  # 0: the fallback schedule


def test_auto_detects_even_where_the_worker_names_a_language() -> None:
    assert SpeechOptions(language="auto").language_for("de") is None
    assert SpeechOptions().language_for("de") == "de"
    assert SpeechOptions(language="fr").language_for("de") == "fr"


@pytest.mark.parametrize(
    ("form", "reason"),
    [
        ({"language": "xx"}, f"unknown language 'xx': {CODE}; e.g. en, de, fr, es, zh"),
        ({"language": "German"}, f"unknown language 'German': {CODE}; german is 'de'"),
        ({"task": "summarize"}, "task must be transcribe or translate, not 'summarize'"),
        ({"word_timestamps": "maybe"}, "word_timestamps must be true or false, not 'maybe'"),
        ({"temperature": "hot"}, "temperature must be a number, not 'hot'"),
        ({"temperature": "1.5"}, "temperature must be between 0 and 1, not 1.5"),
        ({"max_words_per_cue": "0"}, "max_words_per_cue must be between 1 and 50, not 0"),
        ({"max_words_per_cue": "2.5"}, "max_words_per_cue must be an integer, not '2.5'"),
        ({"prompt": "x" * 1001}, "the prompt is longer than 1000 characters"),
    ],
)
def test_wrong_options_are_refused_with_their_reason(form: dict, reason: str) -> None:
    with pytest.raises(BadOption) as caught:
        SpeechOptions.parse(form)
    assert str(caught.value) == reason


def test_an_english_only_model_cannot_translate_or_hear_another_language() -> None:
    with pytest.raises(BadOption, match="model tiny.en is English-only: it cannot translate"):
        SpeechOptions(task="translate").check_model("tiny.en")
    with pytest.raises(BadOption, match=r"cannot transcribe german \(de\); use a multilingual model"):
        SpeechOptions(language="de").check_model("/models/base.en/")
    with pytest.raises(BadOption, match="it cannot translate"):  # a worker knows it from the loaded model
        SpeechOptions(task="translate").check_model("/models/custom", english=True)
    for fine in (SpeechOptions(language="auto"), SpeechOptions(language="en"), SpeechOptions()):
        fine.check_model("tiny.en")
    SpeechOptions(task="translate", language="de").check_model("small")
