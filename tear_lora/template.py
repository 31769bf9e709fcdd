"""The one format: a triple as tagged segments with span roles. Data, generation and evaluation all use it.

    <|input|>{input}<|/input|><|response|>{response}<|/response|><|witness|>{witness}<|/witness|>

Span roles (the documented rule): a token's role says which loss it counts toward as a prediction target.
  - CONTEXT: `<|input|>`, the input text, `<|/input|>`, `<|response|>`, `<|witness|>` (no loss; the opening
    tags of response and witness are given to the model at generation time, so it never has to produce them)
  - RESPONSE: the response text and its closing `<|/response|>` (learned, so generation knows where to stop)
  - WITNESS: the witness text and its closing `<|/witness|>` (learned for the same reason)

User text is encoded with the tokenizer's special-token matching switched off, so a witness that quotes
"<|witness|>" (or "<|endoftext|>") stays plain text and can never become a structural token.
"""

from __future__ import annotations

from dataclasses import dataclass

from .tokens import INPUT_CLOSE, INPUT_OPEN, RESPONSE_CLOSE, RESPONSE_OPEN, WITNESS_CLOSE, WITNESS_OPEN

CONTEXT, RESPONSE, WITNESS = 0, 1, 2
ROLE_NAMES = {CONTEXT: "context", RESPONSE: "response", WITNESS: "witness"}
PAD_ROLE = -1  # padding positions in a batch


@dataclass(frozen=True)
class Segment:
    text: str
    role: int
    is_tag: bool = False


def segments(input: str, response: str | None = None, witness: str | None = None) -> list[Segment]:
    """The triple (or a prefix of it, for prompting) as ordered segments.

    `response=None` gives the prompt for generating a response; `witness=None` with a response gives the
    prompt for predicting the witness. Closing tags of given spans are included; the opening tag of the next
    span to generate ends the prompt.
    """
    parts = [Segment(INPUT_OPEN, CONTEXT, True), Segment(input, CONTEXT), Segment(INPUT_CLOSE, CONTEXT, True),
             Segment(RESPONSE_OPEN, CONTEXT, True)]
    if response is None:
        return parts
    parts += [Segment(response, RESPONSE), Segment(RESPONSE_CLOSE, RESPONSE, True), Segment(WITNESS_OPEN, CONTEXT, True)]
    if witness is None:
        return parts
    return parts + [Segment(witness, WITNESS), Segment(WITNESS_CLOSE, WITNESS, True)]


def render(parts: list[Segment]) -> str:
    """The text form, e.g. for a model card or a user prompting a merged model with plain transformers."""
    return "".join(p.text for p in parts)


def prefix_ids(tokenizer) -> list[int]:
    """The tokenizer's own start-of-text token, when it adds one (Llama-style BOS); Qwen adds none."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("a").input_ids[:1] == [bos] else []


def encode_text(tokenizer, text: str) -> list[int]:
    """User text -> ids with no special-token matching, so tag strings inside it stay text."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids


def encode(tokenizer, parts: list[Segment]) -> tuple[list[int], list[int], list[list[int]]]:
    """Segments -> (input_ids, span_roles, per-segment ids). Tags are single ids, text is encoded verbatim."""
    input_ids, roles, pieces = [], [], []
    prefix = prefix_ids(tokenizer)
    input_ids += prefix
    roles += [CONTEXT] * len(prefix)
    for part in parts:
        ids = [tokenizer.convert_tokens_to_ids(part.text)] if part.is_tag else encode_text(tokenizer, part.text)
        pieces.append(ids)
        input_ids += ids
        roles += [part.role] * len(ids)
    return input_ids, roles, pieces
