"""Build a tiny, untrained judge model folder from config (nothing is downloaded).

``python -m rlaif_ray.ranker.tiny_judge --out checkpoints/tiny_judge`` writes a byte-level
tokenizer (the 256 byte symbols, no merges, so it can spell any text, the ``ranking:`` line
included), a chat template, and a randomly initialised 2-layer Llama (width 64). The folder
loads with transformers (the ``judge`` ranker backend) and is served by ``vllm serve`` (the
``openai`` backend). Untrained, it answers nonsense unless the server constrains its decoding
to the ordering format (``ranker.openai_structured_output``): the tests use it to exercise the
serving path, not to judge.

``--vision`` writes a tiny vision-language judge instead (:func:`build_tiny_vision_judge`): a
LLaVA-style model, so that the ``openai`` backend's frames can be served by vLLM and counted.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Longest context the model is built for: a listwise prompt of a few short answers is ~1000 bytes.
MAX_POSITIONS = 4096
# Server-side cap on new tokens (vLLM reads it from generation_config.json as the default
# max_tokens): an unconstrained untrained model would otherwise babble to the end of its context.
MAX_NEW_TOKENS = 128
IMAGE_TOKEN = "<image>"
# The vision judge's images: 64 px squares (the synthetic videos' frame size) in 16 px patches,
# so each image is 16 tokens of the prompt.
IMAGE_SIZE = 64
PATCH_SIZE = 16
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2


def build_byte_tokenizer(extra_special_tokens: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: one token per byte (GPT-2's byte-to-unicode symbols), the special
    tokens, the chat roles and ``extra_special_tokens``, and :data:`CHAT_TEMPLATE`."""
    vocab: dict[str, int] = {}
    for token in [
        *SPECIAL_TOKENS,
        *ROLE_TOKENS,
        *extra_special_tokens,
        *sorted(pre_tokenizers.ByteLevel.alphabet()),
    ]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=[*ROLE_TOKENS, *extra_special_tokens],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = MAX_POSITIONS
    return tokenizer


def _text_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """The 2-layer width-64 Llama both judges share."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,  # head size 32: the smallest that vLLM's CPU attention takes
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )


def _generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=MAX_NEW_TOKENS,
    )


def build_tiny_judge(out: str | Path, seed: int = 0) -> Path:
    """Write the tiny judge folder (tokenizer, chat template, Llama weights in float32) to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = build_byte_tokenizer()
    tokenizer.save_pretrained(out)
    model = LlamaForCausalLM(_text_config(tokenizer))
    model.generation_config = _generation_config(tokenizer)
    model.save_pretrained(out)
    return out


def build_tiny_vision_judge(out: str | Path, seed: int = 0) -> Path:
    """Write a tiny, untrained LLaVA-style judge folder to ``out``: a 2-layer width-64 CLIP vision
    tower over 64 px images (:data:`IMAGE_TOKENS` tokens per image), a projector, the judge's Llama
    over the byte tokenizer plus an :data:`IMAGE_TOKEN` token, and a ``LlavaProcessor`` (CLIP
    image processor, chat template), in float32.

    The folder loads with transformers and is served by vLLM's CPU build
    (``--limit-mm-per-prompt '{"image": N}'``), which places :data:`IMAGE_TOKENS` prompt tokens per
    image sent: what lets a test see that frames reached the model.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = build_byte_tokenizer((IMAGE_TOKEN,))
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=64,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=_text_config(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",  # the patches, not the CLS token
        vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config = _generation_config(tokenizer)
    model.save_pretrained(out)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        ),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, which "default" drops
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )
    processor.save_pretrained(out)
    # transformers 5 saves the tower as `vision_tower.<module>`; vLLM 0.32's LLaVA loader reads
    # `vision_tower.vision_model.<module>` (the layout of transformers 4 checkpoints).
    weights_file = out / "model.safetensors"
    weights = {
        key.replace("vision_tower.", "vision_tower.vision_model.", 1)
        if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model.")
        else key: tensor
        for key, tensor in load_file(weights_file).items()
    }
    save_file(weights, weights_file, metadata={"format": "pt"})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write the judge model into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vision", action="store_true", help="a LLaVA-style vision-language judge")
    args = parser.parse_args()
    build = build_tiny_vision_judge if args.vision else build_tiny_judge
    print(f"wrote {build(args.out, seed=args.seed)}")


if __name__ == "__main__":
    main()
