from tear_lora.data import template
from tear_lora.data.template import CONTEXT, RESPONSE, WITNESS


def test_roles_line_up_with_spans(tokenizer):
    triple = ("How do I stop my sink smelling?", " Pour baking soda, then vinegar.", " The smell was gone by evening.")
    ids, roles, _ = template.encode(tokenizer, template.segments(*triple))
    for role, text in zip((RESPONSE, WITNESS), triple[1:]):
        span = [i for i, r in zip(ids, roles) if r == role]
        assert tokenizer.decode(span[:-1]) == text  # the text, then its closing tag
    close = {RESPONSE: "<|/response|>", WITNESS: "<|/witness|>"}
    for role, tag in close.items():
        span = [i for i, r in zip(ids, roles) if r == role]
        assert span[-1] == tokenizer.convert_tokens_to_ids(tag)
    context = [i for i, r in zip(ids, roles) if r == CONTEXT]
    assert tokenizer.decode(context) == f"<|input|>{triple[0]}<|/input|><|response|><|witness|>"


def test_prompts_are_prefixes_of_the_full_format(tokenizer):
    full, _, _ = template.encode(tokenizer, template.segments("q", "a", "w"))
    for prompt in (template.segments("q"), template.segments("q", "a")):
        ids, roles, _ = template.encode(tokenizer, prompt)
        assert full[: len(ids)] == ids
    assert template.render(template.segments("q", "a")) == "<|input|>q<|/input|><|response|>a<|/response|><|witness|>"
