"""The chat template servers use renders exactly template.py's prompts (one source of truth): a user message is
the response prompt, an assistant message the response span, and the generation prompt after it the witness
prompt; other shapes are refused."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tear_lora.data import template
from tear_lora.data.tokens import WITNESS_OPEN

TEXTS = ["How do I stop my sink smelling?", " leading space", "trailing\n", "ünïcödé 漢字 🚀", "{{ jinja }} {% if %}",
         "quotes ' \" \\ and \t tabs", "a <|witness|> tag quoted in text"]


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_model_dir):
    """The tiny model's tokenizer (real Qwen3 vocabulary + tags) with the template, as merge saves it; loaded once."""
    from tear_lora.data.tokens import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    tokenizer.chat_template = template.chat_template_for(tokenizer)
    return tokenizer


def _render(tokenizer, messages, **kwargs):
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


@pytest.mark.parametrize("x", TEXTS)
def test_user_message_is_the_response_prompt_byte_for_byte(chat_tokenizer, x):
    expected = template.render(template.segments(x))
    for generation_prompt in (True, False):  # the response prompt necessarily ends with <|response|>
        rendered = _render(chat_tokenizer, [{"role": "user", "content": x}], add_generation_prompt=generation_prompt)
        assert rendered.encode() == expected.encode()


@pytest.mark.parametrize("x", TEXTS[:4])
def test_token_ids_equal_the_training_encoding(chat_tokenizer, x):
    ids = chat_tokenizer.apply_chat_template([{"role": "user", "content": x}], add_generation_prompt=True,
                                             return_dict=False)
    assert ids == template.encode(chat_tokenizer, template.segments(x))[0]


@pytest.mark.parametrize("x,y", [(TEXTS[0], " Pour baking soda, then vinegar."), (TEXTS[3], TEXTS[4])])
def test_assistant_message_is_the_response_span_and_then_the_witness_prompt(chat_tokenizer, x, y):
    messages = [{"role": "user", "content": x}, {"role": "assistant", "content": y}]
    witness_prompt = template.render(template.segments(x, y))
    assert witness_prompt.endswith(WITNESS_OPEN)
    assert _render(chat_tokenizer, messages) == witness_prompt[: -len(WITNESS_OPEN)]  # ... y<|/response|>
    assert _render(chat_tokenizer, messages, add_generation_prompt=True) == witness_prompt
    ids = chat_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids == template.encode(chat_tokenizer, template.segments(x, y))[0]


def test_tag_strings_inside_messages_become_tags_unlike_encode(chat_tokenizer):
    """The documented limit of every chat template: the server tokenizes the rendered string as a whole, so a tag
    typed inside a message is a tag token there; template.encode (training, tear-lora generate) keeps it text."""
    x = TEXTS[-1]
    ids = chat_tokenizer.apply_chat_template([{"role": "user", "content": x}], add_generation_prompt=True,
                                             return_dict=False)
    witness_open = chat_tokenizer.convert_tokens_to_ids(WITNESS_OPEN)
    assert witness_open in ids
    assert witness_open not in template.encode(chat_tokenizer, template.segments(x))[0]


def test_openai_content_parts_are_joined(chat_tokenizer):
    parts = [{"type": "text", "text": "Is it "}, {"type": "text", "text": "safe?"}]
    assert _render(chat_tokenizer, [{"role": "user", "content": parts}], add_generation_prompt=True) == \
        template.render(template.segments("Is it safe?"))


@pytest.mark.parametrize("roles", [["system", "user"], ["user", "assistant", "user"], ["assistant"],
                                   ["user", "user"]])
def test_other_conversations_are_refused_with_the_reason(chat_tokenizer, roles):
    with pytest.raises(Exception, match="one user message"):
        _render(chat_tokenizer, [{"role": r, "content": "x"} for r in roles], add_generation_prompt=True)


def test_bos_variant_starts_with_the_bos_token(chat_tokenizer):
    from jinja2 import Environment

    def fail(message):
        raise ValueError(message)

    rendered = Environment().from_string(template.chat_template(bos_token=True)).render(
        messages=[{"role": "user", "content": "q"}], bos_token="<s>", add_generation_prompt=True,
        raise_exception=fail)
    assert rendered == "<s>" + template.render(template.segments("q"))
    assert template.chat_template_for(chat_tokenizer) == template.chat_template(bos_token=False)  # Qwen adds none


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(x=st.text(max_size=60), y=st.text(max_size=60))
def test_any_text_renders_as_template_py_does(chat_tokenizer, x, y):
    assert _render(chat_tokenizer, [{"role": "user", "content": x}], add_generation_prompt=True) == \
        template.render(template.segments(x))
    assert _render(chat_tokenizer, [{"role": "user", "content": x}, {"role": "assistant", "content": y}],
                   add_generation_prompt=True) == template.render(template.segments(x, y))
