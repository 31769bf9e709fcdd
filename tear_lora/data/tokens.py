"""The six structural tokens: added to a tokenizer as single special ids, given sensible starting rows.

Why rows are initialised: a freshly added row is random (after a resize) or a never-trained spare row (Qwen3
pads its embedding matrix to 151,936 while its tokenizer uses 151,669). Either makes the first steps spend
their gradient undoing noise. We start each tag at the mean embedding of a few words that say what it marks,
so the model sees "start of a consequence" rather than static. The rule is deterministic, so the same base
always yields the same starting rows (the adapter then carries the trained rows).
"""

from __future__ import annotations

import hashlib
import json

import torch
from transformers import AddedToken

INPUT_OPEN, INPUT_CLOSE = "<|input|>", "<|/input|>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<|response|>", "<|/response|>"
WITNESS_OPEN, WITNESS_CLOSE = "<|witness|>", "<|/witness|>"
STRUCTURAL_TOKENS = (INPUT_OPEN, INPUT_CLOSE, RESPONSE_OPEN, RESPONSE_CLOSE, WITNESS_OPEN, WITNESS_CLOSE)

# The words whose mean embedding starts each tag's row ("mean_of_words").
INIT_WORDS = {
    INPUT_OPEN: " input message question request",
    INPUT_CLOSE: " end of message",
    RESPONSE_OPEN: " response answer reply",
    RESPONSE_CLOSE: " end of answer",
    WITNESS_OPEN: " consequence outcome result what happened",
    WITNESS_CLOSE: " end of story",
}

# Rows are padded to a multiple of this when the matrix must grow (tensor-core friendly shapes).
RESIZE_MULTIPLE = 64


def load_tokenizer(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    """The base model's tokenizer with the structural tokens added."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    add_structural_tokens(tokenizer)
    return tokenizer


def add_structural_tokens(tokenizer) -> dict[str, int]:
    """Add the tags as special tokens (idempotent) and return tag -> id.

    Special so that decoding with skip_special_tokens hides them; normalized=False so they match verbatim.
    Ids go right after the tokenizer's last entry, which for Qwen3 lands inside its spare embedding rows.
    """
    missing = [t for t in STRUCTURAL_TOKENS if t not in tokenizer.get_added_vocab()]  # a few dozen entries
    if missing:  # the whole vocabulary (~0.1 s on Qwen3's 151k) only when a tag is not an added token
        vocab = tokenizer.get_vocab()
        missing = [t for t in missing if t not in vocab]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    if tokenizer.pad_token is None:  # base models often lack one; padding is masked out of every loss anyway
        tokenizer.pad_token = tokenizer.eos_token
    return structural_token_ids(tokenizer)


def structural_token_ids(tokenizer) -> dict[str, int]:
    """tag -> id, checking each tag really is one token (a tokenizer without them fails loudly here)."""
    ids = {}
    for tag in STRUCTURAL_TOKENS:
        encoded = tokenizer.encode(tag, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(f"structural token {tag} is not a single token in this tokenizer ({encoded})")
        ids[tag] = encoded[0]
    return ids


def fit_embeddings(model, tokenizer, init: str = "mean_of_words") -> list[int]:
    """Make room for every tokenizer id and initialise the structural rows; returns the tag ids.

    Spare rows are used when the matrix already has them; otherwise it grows to a multiple of 64.
    """
    ids = structural_token_ids(tokenizer)
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=RESIZE_MULTIPLE, mean_resizing=False)
        _fill_padding_rows(model, rows, len(tokenizer))
    if init != "none":
        _init_rows(model, tokenizer, ids, init)
    return list(ids.values())


@torch.no_grad()
def _fill_padding_rows(model, old_rows: int, used_rows: int) -> None:
    """Rows past the tokenizer exist only for the multiple-of-64 shape; give them the mean of the original rows
    (instead of the resize's random init) so every load of the same base yields bit-identical matrices."""
    for weight in {id(w): w for w in (model.get_input_embeddings().weight,
                                      getattr(model.get_output_embeddings(), "weight", None)) if w is not None}.values():
        weight[used_rows:] = weight[:old_rows].float().mean(dim=0).to(weight.dtype)


@torch.no_grad()
def _init_rows(model, tokenizer, ids: dict[str, int], init: str) -> None:
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != matrices[0].data_ptr():  # untied: init both sides
        matrices.append(output.weight)
    for weight in matrices:
        original_rows = weight[: min(len(tokenizer), weight.shape[0]) - len(ids)].float()
        for tag, token_id in ids.items():
            if init == "mean":
                row = original_rows.mean(dim=0)
            else:
                word_ids = tokenizer.encode(INIT_WORDS[tag], add_special_tokens=False)
                row = weight[word_ids].float().mean(dim=0)
            weight[token_id] = row.to(weight.dtype)


def tokenizer_hash(tokenizer) -> str:
    """Identity of a vocabulary (ids, tags included), independent of where the tokenizer was loaded from."""
    return _vocabulary_facts(tokenizer)[0]


def longest_entry(tokenizer) -> int:
    """Characters in the vocabulary's longest entry."""
    return _vocabulary_facts(tokenizer)[1]


def _vocabulary_facts(tokenizer) -> tuple[str, int]:
    """(hash, longest entry) from one read of the vocabulary, remembered on the tokenizer.

    Reading and hashing Qwen3's 151k entries takes ~0.3 s and one run asks several times (each data file, the
    metadata, the base check). A tokenizer's vocabulary only changes by adding tokens, so its length keys what
    is remembered."""
    size = len(tokenizer)
    remembered = getattr(tokenizer, "_tear_lora_vocabulary", None)
    if remembered is None or remembered[0] != size:
        vocab = tokenizer.get_vocab()
        ordered = sorted(vocab.items(), key=lambda kv: kv[1])
        digest = hashlib.sha256(json.dumps(ordered, ensure_ascii=False).encode()).hexdigest()[:16]
        remembered = (size, (digest, max(map(len, vocab), default=1)))
        tokenizer._tear_lora_vocabulary = remembered
    return remembered[1]
