"""Every verb answers a user's mistake with one line on stderr and exit 2, never a traceback; training's own
exit statuses (4: non-finite loss, 130: SIGINT) are what a real `tear-lora train` process returns."""

import signal

import pytest

from tear_lora.cli import main

from .train.test_train import signal_after_first_step, tear_lora, write_recipe


def bad_inputs(tmp_path):
    """(argv, what the message must name) for each verb, with inputs a user gets wrong."""
    missing = tmp_path / "no-such-thing"
    not_adapter = tmp_path / "just-a-dir"
    not_adapter.mkdir(exist_ok=True)
    (not_adapter / "notes.txt").write_text("mine")
    typo = tmp_path / "typo.yaml"
    typo.write_text("objective:\n  lamda: 1\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    return [
        (["recipe", "validate", str(typo)], "did you mean 'lambda'"),
        (["recipe", "show", str(missing)], "not found"),
        (["data", "prepare", str(empty), "--recipe", str(typo)], "typo.yaml:2"),
        (["train", str(missing)], "not found"),
        (["train", str(typo)], "typo.yaml:2"),
        (["plan", str(typo)], "typo.yaml:2"),
        (["merge", str(missing), "--out", str(tmp_path / "out")], str(missing)),
        (["merge", str(not_adapter), "--out", str(tmp_path / "out")], str(not_adapter)),
        (["generate", str(not_adapter), "--input", "hi"], str(not_adapter)),
        (["eval", str(missing), "--data", str(empty)], str(missing)),
        (["compare", str(missing), str(not_adapter), "--data", str(empty)], str(missing)),
        (["sweep", str(typo), "--lambdas", "0,1"], "typo.yaml:2"),
        (["sweep", str(missing), "--lambdas", "0,x"], "lambdas"),
        (["analyze", str(missing), "--data", str(empty)], str(missing)),
        (["report", str(not_adapter)], str(not_adapter)),
        (["bundle", str(missing), "--out", str(tmp_path / "bundle")], str(missing)),
        (["serve", str(not_adapter)], str(not_adapter)),
        (["split-domains", str(empty), "--hold-out", "code", "--out", str(tmp_path / "split")], str(empty)),
    ]


@pytest.mark.parametrize("case", range(18))
def test_each_verb_refuses_bad_input_in_one_line(case, tmp_path, capsys):
    argv, named = bad_inputs(tmp_path)[case]
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and named in err, (argv, err)


def test_bad_inputs_cover_every_verb(tmp_path):
    from tear_lora.cli import build_parser

    verbs = set(build_parser()._subparsers._group_actions[0].choices)
    assert {argv[0] for argv, _ in bad_inputs(tmp_path)} == verbs
    assert len(bad_inputs(tmp_path)) == 18


def test_non_finite_loss_exits_4_without_a_traceback(tmp_path, tiny_model_dir, capfd):
    """In this process, through `main`: the SIGINT test below proves a real process exits with what `main` returns."""
    # a learning rate no model survives: the weights overflow within a few steps and the loss is no number
    recipe = write_recipe(tmp_path, tiny_model_dir, "blowup", evaluate=False, max_steps=6, save_steps=100,
                          learning_rate=1e30, max_grad_norm=0)
    rc = main(["train", str(recipe)])
    out = "".join(capfd.readouterr())
    assert rc == 4 and "non-finite" in out and "Traceback" not in out, out[-3000:]


def test_sigint_saves_and_exits_130_without_a_traceback(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path, tiny_model_dir, "ctrl-c", evaluate=False, max_steps=40, save_steps=100,
                          learning_rate=1e-2, logging_steps=1)
    process = tear_lora("train", recipe)
    out = signal_after_first_step(process, signal.SIGINT)
    assert process.returncode == 130, out[-3000:]
    assert "SIGINT: stopped after optimizer step" in out and "--resume" in out and "Traceback" not in out


def test_sweep_stopped_by_sigterm_exits_143_without_a_traceback(tmp_path, tiny_model_dir):
    # a sweep trains in-process, run after run: a scheduler's SIGTERM mid-run ends it like `train`, with the
    # way back named, not with a traceback from inside the loop
    recipe = write_recipe(tmp_path, tiny_model_dir, "sweep-term", max_steps=40, save_steps=100, eval_strategy="no",
                          learning_rate=1e-2, logging_steps=1)
    process = tear_lora("sweep", recipe, "--lambdas", "0,1")
    out = signal_after_first_step(process, signal.SIGTERM)
    assert process.returncode == 143, out[-3000:]
    assert "SIGTERM: stopped after optimizer step" in out and "run the same sweep again" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
