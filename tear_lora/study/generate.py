"""`tear-lora generate`: a response, then the witness (what would happen next), from an adapter or merged model.

Two generation passes, each stopping at its closing tag, because the model was trained that way: it learned to
produce `<|/response|>` and `<|/witness|>` (they are targets) but never `<|witness|>` (context, see
template.py). Both prompts are built by `template.segments` + `template.encode`, the same function the
training data went through, so generation sees exactly the token layout the adapter was trained on; the
generated response is decoded and re-encoded through it too. With a given response only the witness is
predicted: "what would happen if I said this?".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from tear_lora.data import template
from tear_lora.data.tokens import RESPONSE_CLOSE, WITNESS_CLOSE, structural_token_ids

DEFAULT_MAX_NEW_TOKENS = 128  # per span; the CLI verbs and compare share it


@dataclass
class Sampling:
    """Greedy unless a temperature > 0 or a top-p is given. Temperature 0 means greedy, as in the OpenAI API and
    llama.cpp (whatever top-p says); a top-p must keep something, so it lies in (0, 1]."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature is not None and not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def samples(self) -> bool:
        return self.temperature != 0 and (self.temperature is not None or self.top_p is not None)

    def generation_config(self, stop_ids: list[int], pad_id: int):
        from transformers import GenerationConfig

        sample = self.samples
        extra = {"temperature": 1.0 if self.temperature is None else self.temperature,
                 "top_p": 1.0 if self.top_p is None else self.top_p} if sample else {}
        # built from scratch: a base's own generation_config (sampling defaults, other EOS ids) must not leak in
        return GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=sample, eos_token_id=stop_ids,
                                pad_token_id=pad_id, **extra)


@dataclass
class Generated:
    input: str
    response: str
    witness: str
    response_given: bool
    response_complete: bool  # stopped at <|/response|> (not at max_new_tokens or EOS)
    witness_complete: bool

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def _continue(model, tokenizer, parts: list[template.Segment], stop_tag: str, sampling: Sampling) -> tuple[str, bool]:
    """Generate after the prompt `parts` until `stop_tag` (or the token limit); -> (text, stopped at tag).

    Any other special token ends the span too (EOS, another tag, the base's own control tokens): a span was trained
    as plain text closed by its tag, so a control token means it is over. llama-server ends generation the same
    way (at its end-of-generation tokens), so the serving page and this agree on where a span stops."""
    ids, _, _ = template.encode(tokenizer, parts)
    stop_id = structural_token_ids(tokenizer)[stop_tag]
    others = [*tokenizer.all_special_ids, *structural_token_ids(tokenizer).values()]
    stops = list(dict.fromkeys([stop_id, *others]))
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                         generation_config=sampling.generation_config(stops, tokenizer.pad_token_id))
    new = out[0, len(ids):].tolist()
    stopped = stop_id in new
    if new and new[-1] in stops:
        new = new[:-1]
    return tokenizer.decode(new, skip_special_tokens=True).strip(), stopped


def generate_triple(model, tokenizer, input: str, response: str | None = None,
                    sampling: Sampling | None = None) -> Generated:
    """The response (unless given), then the witness for it."""
    sampling = sampling or Sampling()
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    given = response is not None
    complete = True
    if not given:
        response, complete = _continue(model, tokenizer, template.segments(input), RESPONSE_CLOSE, sampling)
    witness, witness_complete = _continue(model, tokenizer, template.segments(input, response), WITNESS_CLOSE,
                                          sampling)
    return Generated(input, response, witness, given, complete, witness_complete)


def format_generated(g: Generated, max_new_tokens: int) -> str:
    """Clearly labelled, with a note where a span ran out of tokens before its closing tag."""
    def note(done: bool, tag: str) -> str:
        return "" if done else f"\n  [no {tag} within {max_new_tokens} new tokens]"

    return (f"== input ==\n{g.input}\n"
            f"== response ({'given' if g.response_given else 'generated'}) ==\n{g.response}"
            f"{note(g.response_complete, RESPONSE_CLOSE)}\n"
            f"== witness (predicted consequence) ==\n{g.witness}{note(g.witness_complete, WITNESS_CLOSE)}")
