"""Build the tiny built-in default model folder, entirely from config (nothing is downloaded).

``python -m rlaif_ray.models.tiny --out checkpoints/tiny`` writes a word-level tokenizer over the
synthetic task's vocabulary, a randomly initialised 4-layer Llama (width 128), a randomly
initialised open_clip ViT (2 layers, width 64, patch 16) and ``policy.json``. Every later stage
loads it from disk exactly as it would load a real checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import open_clip
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rlaif_ray.config import Config
from rlaif_ray.data.synthetic import VOCABULARY
from rlaif_ray.models.policy import POLICY_FILE

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<video>"]
TEMPLATE_WORDS = ["question", ":", "answer", "?", ",", "."]
PROMPT_TEMPLATE = "<video> question : {question} answer :"
VISION_NAME = "rlaif-tiny-vit"
# open_clip's OPENAI_DATASET_MEAN / STD: the normalisation every CLIP checkpoint expects.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def build_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: whitespace/punctuation split, one id per known word."""
    vocab: dict[str, int] = {}
    for token in [*SPECIAL_TOKENS, *TEMPLATE_WORDS, *words]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<video>"],
    )


def tiny_vision_config(image_size: int = 64) -> dict:
    """An open_clip model config (vision tower of interest; the text tower is a stub)."""
    return {
        "embed_dim": 64,
        "vision_cfg": {
            "image_size": image_size,
            "layers": 2,
            "width": 64,
            "head_width": 32,
            "patch_size": 16,
        },
        "text_cfg": {"context_length": 8, "vocab_size": 32, "width": 32, "heads": 2, "layers": 1},
    }


def build_tiny(
    out: str | Path, seed: int = 0, image_size: int = 64, hidden: int = 128, layers: int = 4
) -> Path:
    """Write the tiny default model folder to ``out`` and return it."""
    out = Path(out)
    (out / "lm").mkdir(parents=True, exist_ok=True)
    (out / "vision").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    tokenizer = build_tokenizer(list(VOCABULARY))
    tokenizer.save_pretrained(out / "lm")
    lm_cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(lm_cfg).save_pretrained(out / "lm")

    config_path = out / "vision" / f"{VISION_NAME}.json"
    config_path.write_text(json.dumps(tiny_vision_config(image_size), indent=2))
    open_clip.add_model_config(str(config_path))
    clip = open_clip.create_model(VISION_NAME, pretrained=None)
    torch.save(clip.state_dict(), out / "vision" / "open_clip_model.pt")

    spec = {
        "lm": "lm",
        "vision": {
            "open_clip_model": VISION_NAME,
            "open_clip_config": f"vision/{VISION_NAME}.json",
            "pretrained": "vision/open_clip_model.pt",
        },
        "image_size": image_size,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "video_token": "<video>",
        "prompt_template": PROMPT_TEMPLATE,
    }
    (out / POLICY_FILE).write_text(json.dumps(spec, indent=2))
    return out


def ensure_model(cfg: Config) -> Path:
    """The model folder of ``model.path``; the tiny default is built there when missing and allowed."""
    path = Path(cfg.model.path)
    if (path / POLICY_FILE).is_file():
        return path
    if not cfg.model.build_tiny_if_missing:
        raise FileNotFoundError(
            f"model.path {str(path)!r} holds no policy.json and model.build_tiny_if_missing is false"
        )
    log.info("building the tiny default model into %s", path)
    return build_tiny(path, seed=cfg.seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write the model into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"wrote {build_tiny(args.out, seed=args.seed)}")


if __name__ == "__main__":
    main()
