"""The one format: a triple as tagged segments with span roles. Data, generation and evaluation all use it.

    <|input|>{input}<|/input|><|response|>{response}<|/response|><|witness|>{witness}<|/witness|>

Span roles (the documented rule): a token's role says which loss it counts toward as a prediction target.
  - CONTEXT: `<|input|>`, the input text, `<|/input|>`, `<|response|>`, `<|witness|>` (no loss; the opening
    tags of response and witness are given to the model at generation time, so it never has to produce them)
  - RESPONSE: the response text and its closing `<|/response|>` (learned, so generation knows where to stop)
  - WITNESS: the witness text and its closing `<|/witness|>` (learned for the same reason)

User text is encoded with the tokenizer's special-token matching switched off, so a witness that quotes
"<|witness|>" (or "<|endoftext|>") stays plain text and can never become a structural token.

Servers (vLLM, llama.cpp's server, TGI, Ollama) format prompts with the tokenizer's Jinja chat template, not with
this module, so `chat_template()` generates that template from `segments()` itself: one source of truth, and a
test renders both and compares them byte for byte.
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


# ---- chat template for servers ----------------------------------------------------------------------------------

CHAT_USAGE = ("a tear_lora model takes one user message (the input) and, to predict its witness, that message "
              "followed by one assistant message (the response)")


def chat_template(bos_token: bool = False) -> str:
    """The Jinja chat template that renders OpenAI-style messages as this module's prompts.

    - `[user x]` + generation prompt -> `render(segments(x))`: the model writes the response and stops at
      `<|/response|>` (an end-of-generation token of the merged model);
    - `[user x, assistant y]` -> the input and the response span (`... y<|/response|>`); with the generation
      prompt, `render(segments(x, y))`: the model writes the witness of `y`, stopping at `<|/witness|>`. This is
      how a chat server is asked for the witness of a given response;
    - anything else (a system message, several turns) raises: the model never saw another shape, and a silent
      reformatting would give answers from a prompt it was not trained on.

    Built by rendering `segments()` with marker strings and cutting at them, so the literal tag text between
    the messages is exactly what `render()` produces. `bos_token`: start with the tokenizer's BOS (when its
    encoder adds one, as `prefix_ids` does; servers tokenize the rendered text without adding special tokens).
    Message text is rendered verbatim; a server then tokenizes the whole string, so (as with every chat
    template) a tag string typed inside a message becomes a tag token there, unlike `encode_text`.
    """
    marks = ("\x00input\x00", "\x00response\x00")
    open_input, response_prompt = render(segments(marks[0])).split(marks[0])  # <|input|>, <|/input|><|response|>
    parts = segments(marks[0], marks[1])
    close_response = render([p for p in parts if p.role == RESPONSE and p.is_tag])  # <|/response|>
    after_response = render(parts).split(marks[1])[1]
    assert after_response.startswith(close_response), after_response
    open_witness = after_response[len(close_response):]  # <|witness|>
    for literal in (open_input, response_prompt, close_response, open_witness):
        assert not any(d in literal for d in ("{{", "{%", "{#", "}}", "%}", "#}", "'")), literal
    shape = render(segments("{input}", "{response}", "{witness}"))
    return "".join([
        "{#- tear_lora chat template, generated by tear_lora.data.template.chat_template from the training format: ",
        shape, " -#}\n",
        "{%- if messages | length < 1 or messages | length > 2 or messages[0]['role'] != 'user'",
        " or (messages | length == 2 and messages[1]['role'] != 'assistant') -%}\n",
        "{{- raise_exception('", CHAT_USAGE, "') -}}\n",
        "{%- endif -%}\n",
        "{{- bos_token -}}" if bos_token else "",
        open_input, _content("messages[0]['content']"), response_prompt,
        "{%- if messages | length == 2 -%}",
        _content("messages[1]['content']"), close_response,
        "{%- if add_generation_prompt -%}", open_witness, "{%- endif -%}",
        "{%- endif -%}",
    ])


def _content(var: str) -> str:
    """Jinja for a message's text: a string, or OpenAI content parts (`[{"type": "text", "text": ...}]`) joined."""
    return ("{%- if " + var + " is string -%}{{- " + var + " -}}{%- else -%}{%- for part in " + var + " -%}"
            "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}{%- endfor -%}{%- endif -%}")


def chat_template_for(tokenizer) -> str:
    """`chat_template()` with the BOS exactly when `encode` starts with one for this tokenizer."""
    return chat_template(bos_token=bool(prefix_ids(tokenizer)))
