"""Build a tiny, untrained judge model folder from config (nothing is downloaded).

``python -m rlaif_ray.ranker.tiny_judge --out checkpoints/tiny_judge`` writes a byte-level
tokenizer (the 256 byte symbols, no merges, so it can spell any text, the ``ranking:`` line
included), a chat template, and a randomly initialised 2-layer Llama (width 64). The folder
loads with transformers (the ``judge`` ranker backend) and is served by ``vllm serve`` (the
``openai`` backend). Untrained, it answers nonsense unless the server constrains its decoding
to the ordering format (``ranker.openai_structured_output``): the tests use it to exercise the
serving path, not to judge.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: one token per byte (GPT-2's byte-to-unicode symbols), the special
    tokens and the chat roles, and :data:`CHAT_TEMPLATE`."""
    vocab: dict[str, int] = {}
    for token in [*SPECIAL_TOKENS, *ROLE_TOKENS, *pre_tokenizers.ByteLevel.alphabet()]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=ROLE_TOKENS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = MAX_POSITIONS
    return tokenizer


def build_tiny_judge(out: str | Path, seed: int = 0) -> Path:
    """Write the tiny judge folder (tokenizer, chat template, Llama weights in float32) to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = build_byte_tokenizer()
    tokenizer.save_pretrained(out)
    config = LlamaConfig(
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
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=MAX_NEW_TOKENS,
    )
    model.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write the judge model into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"wrote {build_tiny_judge(args.out, seed=args.seed)}")


if __name__ == "__main__":
    main()
