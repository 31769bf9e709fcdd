"""eval / compare / generate / sweep: JSON schemas, the plot, the template-built prompts, resumable sweeps."""

import json
import math
import shutil

import pytest

from tear_lora.cli import main
from tear_lora.study.evaluate import BASE_LABEL, ROW_KEYS

from ..release_helpers import LAMBDAS, trained_pair

INPUT = "My neighbour keeps parking across my driveway. What should I do?"


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_model_dir):
    return trained_pair(tmp_path_factory, tiny_model_dir)


@pytest.fixture(scope="module")
def adapters(pair):
    from tear_lora.adapters import AdapterSet

    return AdapterSet(pair["a"])


def _json(capsys):
    return json.loads(capsys.readouterr().out)


def _check_rows(rows):
    assert [r["kind"] for r in rows] == ["adapter", "adapter", "base"]
    assert [r["lambda"] for r in rows] == [*LAMBDAS, None]
    assert rows[-1]["name"] == BASE_LABEL
    for row in rows:
        assert set(row) == set(ROW_KEYS)
        assert row["rows"] == 6 and row["response_tokens"] > 0 and row["witness_tokens"] > 0
        for span in ("response", "witness"):
            assert math.isfinite(row[f"{span}_nll"]) and row[f"{span}_nll"] > 0
            assert row[f"{span}_ppl"] == pytest.approx(math.exp(row[f"{span}_nll"]))
    assert rows[0]["witness_nll"] != rows[1]["witness_nll"]


def test_eval_json_schema_and_base_row(pair, adapters, capsys):
    assert main(["eval", str(pair["a"]), str(pair["b"]), "--data", str(pair["eval"]), "--json"]) == 0
    rows = _json(capsys)
    _check_rows(rows)
    # the base row (adapters disabled) is the plain 4-bit base
    from tear_lora.data.prepare import prepare
    from tear_lora.study.evaluate import span_nll
    from tear_lora.train.model import load_base

    dataset = prepare(pair["eval"], adapters.tokenizer, adapters.recipe, save=False).dataset
    plain = span_nll(load_base(adapters.recipe, adapters.tokenizer), dataset, adapters.tokenizer.pad_token_id)
    for key in ("response_nll", "witness_nll"):
        assert rows[-1][key] == pytest.approx(plain[key], abs=1e-5)


def test_compare_json_table_generations_and_plot(pair, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"input": INPUT}) + "\n" + json.dumps({"input": "Hi", "response": "Hello"}) + "\n")
    plot = tmp_path / "plots" / "lambda.png"
    # given in reverse order: the table is sorted by lambda
    assert main(["compare", str(pair["b"]), str(pair["a"]), "--data", str(pair["eval"]), "--prompts", str(prompts),
                 "--plot", str(plot), "--max-new-tokens", "3", "--json"]) == 0
    report = _json(capsys)
    assert set(report) == {"rows", "generations", "timing", "plot"}
    _check_rows(report["rows"])
    assert [g["input"] for g in report["generations"]] == [INPUT, "Hi"]
    for item in report["generations"]:
        assert list(item["outputs"]) == ["pair-lambda0", "pair-lambda2"]
    assert report["generations"][1]["outputs"]["pair-lambda2"]["response"] == "Hello"
    timing = report["timing"]
    assert set(timing) == {"base_load_s", "adapter_load_s", "switch_ms", "saved_s", "adapters"}  # no second load
    assert timing["adapters"] == 2 and timing["base_load_s"] > 0 and timing["switch_ms"] < 1000 * timing["base_load_s"]
    assert timing["saved_s"] == pytest.approx(timing["base_load_s"] - 2 * timing["switch_ms"] / 1000)
    assert report["plot"] == str(plot)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000


def test_compare_skip_invalid_overrides_the_recipe_as_its_refusal_says(pair, tmp_path, capsys):
    lines = pair["eval"].read_text().splitlines()
    flawed = tmp_path / "flawed.jsonl"
    flawed.write_text("\n".join([lines[0], '{"input": "no witness", "response": "x"}', *lines[1:]]) + "\n")
    argv = ["compare", str(pair["a"]), str(pair["b"]), "--data", str(flawed), "--json"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{flawed}:2:" in err and "--skip-invalid" in err and "Traceback" not in err
    assert main([*argv, "--skip-invalid"]) == 0
    captured = capsys.readouterr()
    assert all(row["rows"] == 6 for row in json.loads(captured.out)["rows"])  # the invalid row skipped, counted
    assert f"{flawed}: 7 rows read: 6 kept, 1 invalid" in captured.err


def test_generate_with_and_without_response(pair, adapters, capsys):
    from tear_lora.data.template import encode, segments
    from tear_lora.study.generate import Sampling, format_generated, generate_triple

    assert main(["generate", str(pair["a"]), "--input", INPUT, "--response", "Talk to them.", "--max-new-tokens",
                 "4", "--json"]) == 0
    out = _json(capsys)
    assert out["response"] == "Talk to them." and out["response_given"] is True
    assert set(out) == {"input", "response", "witness", "response_given", "response_complete", "witness_complete"}

    prompts, real = [], adapters.model.generate

    def spy(**kwargs):
        prompts.append(kwargs["input_ids"][0].tolist())
        return real(**kwargs)

    adapters.model.generate = spy
    try:
        generated = generate_triple(adapters.model, adapters.tokenizer, INPUT, sampling=Sampling(max_new_tokens=3))
        sampled = [generate_triple(adapters.model, adapters.tokenizer, INPUT, "ok",
                                   Sampling(max_new_tokens=3, temperature=0.7, top_p=0.9, seed=1)) for _ in range(2)]
    finally:
        del adapters.model.generate
    assert not generated.response_given
    text = format_generated(generated, 3)
    assert "== response (generated) ==" in text and "== witness (predicted consequence) ==" in text
    # both prompts come from the template (the response one, then the witness one for the generated response)
    assert prompts[0] == encode(adapters.tokenizer, segments(INPUT))[0]
    assert prompts[1] == encode(adapters.tokenizer, segments(INPUT, generated.response))[0]
    assert sampled[0].witness == sampled[1].witness  # seeded sampling is reproducible


def test_sweep_skips_finished_and_resumes_checkpointed(pair, tmp_path, capsys):
    from tear_lora.study.compare import sweep_recipes, train_sweep

    finished = [pair["a"] / "adapter_model.safetensors", pair["b"] / "adapter_model.safetensors"]
    before = [p.stat().st_mtime_ns for p in finished]
    assert train_sweep(sweep_recipes(pair["recipe"], list(LAMBDAS))) == [pair["a"], pair["b"]]
    assert [p.stat().st_mtime_ns for p in finished] == before  # nothing retrained

    # an interrupted run: a complete checkpoint, no final metadata -> resumed from the checkpoint, not restarted
    out_dir = tmp_path / "adapters"
    shutil.copytree(pair["b"], out_dir / "pair-lambda2")
    (out_dir / "pair-lambda2" / "tear_lora.json").unlink()
    [run_dir] = train_sweep(sweep_recipes(pair["recipe"], [2.0], [f"output.dir={out_dir}"]))
    meta = json.loads((run_dir / "tear_lora.json").read_text())
    assert meta["lambda"] == 2.0 and meta["metrics"]["global_step"] == 2  # resumed at max_steps: no extra step
    assert f"resuming {run_dir} from checkpoint-2" in capsys.readouterr().err


def test_sweep_cli_compares_finished_runs(pair, tmp_path, capsys, monkeypatch):
    import tear_lora.study.compare

    calls = []
    monkeypatch.setattr(tear_lora.study.compare, "compare", lambda *args, **kwargs: calls.append(args) or
                        {"rows": [], "generations": [], "timing": {}, "plot": None})
    assert main(["sweep", str(pair["recipe"]), "--lambdas", "0,2", "--json"]) == 0
    [(dirs, eval_file, prompts, plot)] = calls
    assert dirs == [pair["a"], pair["b"]] and eval_file == str(pair["eval"]) and prompts is None
    assert str(plot).endswith("pair-sweep.png")
    assert main(["sweep", str(pair["recipe"]), "--lambdas", "0,x"]) == 2
    assert "--lambdas" in capsys.readouterr().err


def test_sampling_temperature_zero_is_greedy_and_bad_values_are_refused():
    from tear_lora.study.generate import DEFAULT_MAX_NEW_TOKENS, Sampling

    greedy = Sampling(temperature=0).generation_config([1], 0)
    assert greedy.do_sample is False and Sampling(temperature=0, top_p=0.5).generation_config([1], 0).do_sample is False
    warm = Sampling(temperature=0.7).generation_config([1], 0)
    assert warm.do_sample and warm.temperature == 0.7 and warm.top_p == 1.0
    nucleus = Sampling(top_p=0.9).generation_config([1], 0)
    assert nucleus.do_sample and nucleus.temperature == 1.0 and nucleus.top_p == 0.9
    assert Sampling().max_new_tokens == DEFAULT_MAX_NEW_TOKENS
    for bad in ({"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.5}, {"max_new_tokens": 0}):
        with pytest.raises(ValueError):
            Sampling(**bad)


@pytest.mark.parametrize("flag, value, message", [("--top-p", "0", "top_p must be in (0, 1]"),
                                                   ("--temperature", "-1", "temperature must be >= 0"),
                                                   ("--max-new-tokens", "0", "max_new_tokens must be >= 1")])
def test_generate_refuses_bad_sampling_before_loading(flag, value, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", str(tmp_path / "no-such-adapter"), "--input", INPUT, flag, value])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_generate_temperature_zero_matches_greedy(pair, capsys):
    outputs = []
    for extra in ([], ["--temperature", "0", "--seed", "3"], ["--temperature", "0", "--top-p", "0.5", "--seed", "4"]):
        assert main(["generate", str(pair["a"]), "--input", INPUT, "--max-new-tokens", "6", "--json", *extra]) == 0
        outputs.append(_json(capsys))
    assert outputs[0] == outputs[1] == outputs[2]


def test_a_generated_span_ends_at_any_control_token(tokenizer):
    """A span ends at its closing tag or at any other control token (EOS, another tag, the base's own specials), as
    llama-server ends generation at its end-of-generation tokens: the serving page and `generate` then agree."""
    import torch

    from tear_lora.data import template
    from tear_lora.data.tokens import RESPONSE_CLOSE, WITNESS_OPEN, structural_token_ids
    from tear_lora.study.generate import Sampling, _continue

    tags = structural_token_ids(tokenizer)
    word = tokenizer.encode("Hello", add_special_tokens=False)
    seen = {}

    class Model:
        def parameters(self):
            yield torch.zeros(1)

        def generate(self, input_ids, attention_mask, generation_config):
            seen["stops"] = set(generation_config.eos_token_id)
            return torch.cat([input_ids, torch.tensor([[*word, tags[WITNESS_OPEN]]])], dim=1)

    text, stopped = _continue(Model(), tokenizer, template.segments("hi"), RESPONSE_CLOSE, Sampling())
    assert set(tokenizer.all_special_ids) | set(tags.values()) <= seen["stops"]
    assert (text, stopped) == ("Hello", False)
