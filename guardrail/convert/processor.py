"""The files around the weights of a native InternVL directory: tokenizer, processor and
generation config, shared by the converter and `make-tiny --family internvl`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# What transformers' InternVLProcessor reads off the tokenizer. NOTE: `<video>` is not in
# InternVL2's vocabulary; as in transformers' own conversion it is added after the last id
# (outside the embedding). Our engine never uses it (it lays frames out itself).
MEDIA_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def fast_tokenizer(tokenizer: Any, chat_template: str, *, bos: str = "<s>", eos: str = "</s>",
                   unk: str | None = "<unk>", pad: str = "</s>", max_length: int = 32768):
    """Wrap a `tokenizers.Tokenizer` as a transformers fast tokenizer with InternVL's media
    tokens named."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad,
        extra_special_tokens=dict(MEDIA_TOKENS), chat_template=chat_template,
        model_max_length=max_length, clean_up_tokenization_spaces=False)


def internvl_processor(tokenizer: Any, image_size: int, tokens_per_tile: int):
    """transformers' InternVLProcessor at the checkpoint's own tile size, ImageNet-normalised,
    one tile per image (SafeWatch uses one 448 tile per frame, no thumbnail)."""
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    size = {"height": image_size, "width": image_size}
    norm = {"image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD}
    image = GotOcr2ImageProcessor(size=size, crop_to_patches=False, do_convert_rgb=True, **norm)
    video = InternVLVideoProcessor(size=size, do_convert_rgb=True, **norm)
    return InternVLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                             image_seq_length=tokens_per_tile,
                             chat_template=tokenizer.chat_template)


def generation_config(bos: int, stop: int, pad: int, max_new_tokens: int = 256):
    """Greedy, stop on `<|im_end|>` (the text config keeps `</s>` as eos, as the original)."""
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=bos, eos_token_id=[stop], pad_token_id=pad,
                            do_sample=False, max_new_tokens=max_new_tokens)


def save_all(out: Path, tokenizer: Any, image_size: int, tokens_per_tile: int, gen) -> None:
    internvl_processor(tokenizer, image_size, tokens_per_tile).save_pretrained(out)
    gen.save_pretrained(out)
