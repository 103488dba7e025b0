"""Image captions by a model loaded from ``MORAG_CAPTION_MODEL_PATH``: a caption in the result
when it is set, none when it is not, and a clear failure naming the setting and the folder when
the folder is missing or holds no model.

No real captioning model is reachable offline: the model here is a tiny random ViT-GPT2
(``VisionEncoderDecoderModel``) built by the test and saved with ``save_pretrained``, as a real
one would be. Its caption is gibberish; what is checked is that a folder saved that way is
loaded and its caption reaches the result."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from pipeline.config import Settings
from pipeline.errors import ModelNotFound
from pipeline.kinds import IMAGE
from pipeline.middleware.heartbeat import check_caption_model
from pipeline.processors import images, no_progress
from tests.processors.test_images import render

pytestmark = pytest.mark.slow


def tiny_captioner(folder: Path) -> Path:
    """A tiny random ViT encoder with a GPT-2 decoder, its image processor and a word-level
    tokenizer, saved into ``folder``; its captions are words ``w0`` … ``w59``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        GPT2Config,
        PreTrainedTokenizerFast,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
    )  # fmt: skip

    words = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"] + [f"w{i}" for i in range(60)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]"
    ).save_pretrained(folder)
    encoder = ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, image_size=32,
        patch_size=8,
    )  # fmt: skip
    decoder = GPT2Config(
        n_embd=32, n_layer=1, n_head=2, vocab_size=len(words), n_positions=64, add_cross_attention=True,
        is_decoder=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 1, 0, 2
    model = VisionEncoderDecoderModel(config=config)
    generation = model.generation_config
    generation.decoder_start_token_id, generation.pad_token_id, generation.eos_token_id = 1, 0, 2
    generation.suppress_tokens = [0, 1, 2, 3]  # random weights: only words, so the caption is never empty
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def read(photo: Path, folder: Path, settings: Settings) -> tuple[dict, dict]:
    job = {"task_id": "t1", "kind": IMAGE.name, "filename": photo.name, "media": {"format": "png"}}
    return images.run(job, photo, folder, settings, no_progress, lambda: False)


def test_an_image_gets_a_caption_from_the_configured_model(tmp_path: Path) -> None:
    model = tiny_captioner(tmp_path / "captioner")
    photo = render(tmp_path / "invoice.png")
    outputs, summary = read(photo, tmp_path, Settings(caption_model_path=model))
    data = json.loads(outputs["json"])
    words = data["caption"].split()
    assert words and all(word.startswith("w") and word[1:].isdigit() for word in words)
    assert summary["caption"] == data["caption"]
    assert outputs["md"].endswith(f"## Caption\n\n{data['caption']}\n")
    assert "Quarterly invoice total" in data["text"]  # the OCR is still there
    # Unset: no caption, no error.
    outputs, summary = read(photo, tmp_path, Settings())
    assert "caption" not in json.loads(outputs["json"]) and "caption" not in summary
    assert "## Caption" not in outputs["md"]


def test_a_missing_or_unloadable_caption_model_fails_naming_the_setting_and_the_folder(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    photo = render(tmp_path / "invoice.png")
    missing = tmp_path / "models" / "blip"
    with pytest.raises(ModelNotFound, match=f"^MORAG_CAPTION_MODEL_PATH={missing}: no such folder$"):
        read(photo, tmp_path, Settings(caption_model_path=missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFound, match=f"^MORAG_CAPTION_MODEL_PATH={empty}: no model there"):
        read(photo, tmp_path, Settings(caption_model_path=empty))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-model"}')
    with pytest.raises(
        ModelNotFound, match=f"^MORAG_CAPTION_MODEL_PATH={broken}: cannot load a captioning model"
    ):
        read(photo, tmp_path, Settings(caption_model_path=broken))
    # The worker says so at boot.
    with caplog.at_level(logging.ERROR):
        assert check_caption_model(Settings(caption_model_path=missing)) is not None
    assert "the caption model cannot be loaded: image tasks will fail" in caplog.text
    assert check_caption_model(Settings()) is None
