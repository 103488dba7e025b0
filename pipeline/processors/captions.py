"""Image captions, by a Hugging Face image-captioning model loaded from a configured folder.

``MORAG_CAPTION_MODEL_PATH`` names a folder a model was saved into with
``save_pretrained`` (BLIP, ViT-GPT2 or any other model transformers loads as
image-text-to-text), with its image processor and tokenizer. The model is loaded
once per worker process, on the GPU where torch sees one, and each image gets
one caption. A missing folder, or one that holds no loadable model, is a
:class:`~pipeline.errors.ModelNotFound` that names the setting and the folder.
transformers and torch come with the ``documents`` extra.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from pipeline.errors import ModelNotFound
from pipeline.logs import get_logger

logger = get_logger(__name__)

#: The longest caption, in tokens.
MAX_TOKENS = 40


def problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be a captioning model, at a glance (no loading); None when it may be."""
    if not folder.is_dir():
        return f"MORAG_CAPTION_MODEL_PATH={folder}: no such folder"
    if not (folder / "config.json").is_file():
        return (
            f"MORAG_CAPTION_MODEL_PATH={folder}: no model there"
            " (no config.json; save one with save_pretrained)"
        )
    return None


@functools.cache
def _load(folder: str) -> tuple[Any, Any, Any, str]:
    """The model, its image processor and tokenizer, and the device they run on."""
    if (reason := problem(Path(folder))) is not None:
        raise ModelNotFound(reason)
    try:
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForImageTextToText.from_pretrained(folder).to(device).eval()
        processor = AutoImageProcessor.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except ImportError as exc:
        raise ModelNotFound(
            f"MORAG_CAPTION_MODEL_PATH={folder}: transformers and torch are not installed ({exc})"
        ) from None
    except Exception as exc:  # transformers raises what it likes: OSError, ValueError, KeyError…
        raise ModelNotFound(
            f"MORAG_CAPTION_MODEL_PATH={folder}: cannot load a captioning model: {exc}"
        ) from None
    logger.info("caption model loaded", extra={"folder": folder, "device": device})
    return model, processor, tokenizer, device


def caption(image: Any, folder: Path) -> str:
    """One caption of ``image`` (a Pillow image) by the model in ``folder``."""
    import torch

    model, processor, tokenizer, device = _load(str(folder))
    pixels = processor(images=image.convert("RGB"), return_tensors="pt").pixel_values.to(device)
    with torch.inference_mode():
        ids = model.generate(pixel_values=pixels, max_new_tokens=MAX_TOKENS)
    return str(tokenizer.batch_decode(ids, skip_special_tokens=True)[0]).strip()


def caption_file(path: Path, folder: Path) -> str:
    """The caption of the image file at ``path`` (its first page)."""
    from PIL import Image

    with Image.open(path) as image:
        return caption(image, folder)
