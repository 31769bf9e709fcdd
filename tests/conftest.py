"""Shared fixtures: the real Qwen3 tokenizer and a tiny random Qwen3, built once per test run, offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under `pytest -n N` (scripts/test.sh: xdist) N worker processes share the cores: each gets its share of torch's
# threads (read when torch is first imported, after this), else 2 workers x 2 threads spin against each other.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

REPO = Path(__file__).resolve().parent.parent


# ---- --cpu-durations=N: CPU seconds per test (docs/testing.md) --------------------------------------------------
# Wall time on a shared machine says more about the neighbours than about a test; the CPU seconds a test spends
# (its process, and the child processes it waited for) do not. Works under xdist: each worker reports its own.


def pytest_addoption(parser):
    parser.addoption("--cpu-durations", type=int, default=None, metavar="N",
                     help="show the N tests that used the most CPU seconds (own process + waited children)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if item.config.getoption("cpu_durations") is None or not hasattr(item, "_cpu_end"):
        return
    report, begin, end = outcome.get_result(), item._cpu_begin, item._cpu_end
    own = end.user - begin.user + end.system - begin.system
    children = end.children_user - begin.children_user + end.children_system - begin.children_system
    report.user_properties.append(("cpu", (round(own, 2), round(children, 2))))


@pytest.hookimpl(hookwrapper=True)
def _phase(item):
    item._cpu_begin, item._cpu_end = os.times(), None
    yield
    item._cpu_end = os.times()


pytest_runtest_setup = pytest_runtest_call = pytest_runtest_teardown = _phase
_CPU: dict[str, list[float]] = {}


def pytest_runtest_logreport(report):
    for _, (own, children) in (v for v in report.user_properties if v[0] == "cpu"):
        totals = _CPU.setdefault(report.nodeid, [0.0, 0.0])
        totals[0] += own
        totals[1] += children


def pytest_terminal_summary(terminalreporter, config):
    n = config.getoption("cpu_durations")
    if n is None or not _CPU:
        return
    rows = sorted(_CPU.items(), key=lambda kv: -sum(kv[1]))
    own, children = sum(v[0] for v in _CPU.values()), sum(v[1] for v in _CPU.values())
    terminalreporter.write_sep("=", f"CPU seconds per test: {own + children:.0f} s in all ({own:.0f} s in pytest "
                                    f"processes, {children:.0f} s in child processes), {len(rows)} tests")
    for nodeid, (o, c) in rows[:n] if n else rows:
        terminalreporter.write_line(f"{o + c:8.1f}s cpu {o:8.1f} own {c:8.1f} children  {nodeid}")


# Under xdist (`--dist loadfile`) a worker takes the next whole file when it is free: the longest files go first
# so that no long one starts last while the other worker idles (CPU seconds measured in docs/testing.md). One
# order serves both passes: the slow pass's files first (the fast suite has few or none of their tests).
LONGEST_FIRST = ("test_demo.py", "test_plan.py", "test_verify_demo.py", "test_serving_server.py", "test_serving_page.py",
                 "test_distributed.py", "test_bench.py", "test_user_files.py", "test_train_safety.py", "test_train.py",
                 "test_analyze.py", "test_gguf.py", "test_evaluate.py", "test_export.py", "test_integrity.py",
                 "test_cli_errors.py", "test_packing.py")


def pytest_collection_modifyitems(config, items):
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def qwen_tokenizer():
    from tear_lora.tiny import qwen3_tokenizer

    return qwen3_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tear_lora.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen3")


@pytest.fixture()
def tokenizer(tiny_model_dir):
    """A fresh tokenizer with the structural tokens (tests may mutate it)."""
    from tear_lora.data.tokens import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def make_recipe(tiny_model_dir: Path, tmp_path: Path, **sections):
    """The tiny-cpu recipe pointed at the fixture model and a temporary output, with section overrides."""
    import yaml

    from tear_lora.recipe import recipe_from_dict

    raw = yaml.safe_load((REPO / "recipes" / "tiny-cpu.yaml").read_text())
    raw["model"]["name_or_path"] = str(tiny_model_dir)
    raw["data"]["train_file"] = str(REPO / "data/raw/consequences.jsonl")
    raw["data"]["eval_file"] = str(REPO / "data/raw/eval.jsonl")
    raw["data"]["processed_dir"] = str(tmp_path / "processed")
    raw["output"]["dir"] = str(tmp_path / "adapters")
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return recipe_from_dict(raw, source="tiny-cpu.yaml")


# One SGD step with lr 1 moves each weight by exactly its gradient: the exactness tests compare those steps.
SGD = {"optim": "sgd", "learning_rate": 1.0, "max_grad_norm": 0.0, "lr_scheduler_type": "constant",
       "max_steps": 1, "logging_steps": 1, "save_strategy": "no", "report_to": "none"}

# Response-loss weights by valence for the tests that mix them (objective.response_weight).
WEIGHTS = {"harmful": 0.0, "mixed": 0.5}


def trainable_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def eval_rows(tmp_path_factory, tiny_model_dir):
    """The bundled eval triples, tokenized for the tiny model (not cached on disk)."""
    from tear_lora.data.prepare import prepare
    from tear_lora.data.tokens import load_tokenizer

    recipe = make_recipe(tiny_model_dir, tmp_path_factory.mktemp("rows"))
    return prepare(REPO / "data/raw/eval.jsonl", load_tokenizer(str(tiny_model_dir)), recipe, save=False).dataset


@pytest.fixture(scope="module")
def mixed_rows(eval_rows):
    """8 triples: 3 harmful, 2 mixed, 3 helpful (response weights 0, 0.5, 1 under WEIGHTS)."""
    import json

    valences = [json.loads(meta)["valence"] for meta in eval_rows["meta"]]
    pick = {"harmful": 3, "mixed": 2, "helpful": 3}
    chosen = [i for v, n in pick.items() for i in [j for j, w in enumerate(valences) if w == v][:n]]
    return eval_rows.select(chosen)


@pytest.fixture()
def recipe(tiny_model_dir, tmp_path):
    return make_recipe(tiny_model_dir, tmp_path)


def trainable_model(recipe, tokenizer, seed: int = 0):
    """4-bit tiny base + LoRA + tag rows, initialised reproducibly."""
    import torch

    from tear_lora.data.tokens import structural_token_ids
    from tear_lora.train.model import add_adapters, load_base

    torch.manual_seed(seed)
    base = load_base(recipe, tokenizer)
    return add_adapters(base, recipe, list(structural_token_ids(tokenizer).values()))


def make_trainer(model, recipe, tokenizer, train_dataset, output_dir, eval_dataset=None):
    from tear_lora.train.batch import SpanCollator
    from tear_lora.train.runner import sft_config
    from tear_lora.train.trainer import TearTrainer

    return TearTrainer(model=model, args=sft_config(recipe, output_dir=output_dir), train_dataset=train_dataset,
                       eval_dataset=eval_dataset, processing_class=tokenizer,
                       data_collator=SpanCollator(tokenizer.pad_token_id, response_weight=recipe.objective.response_weight),
                       lambda_=recipe.lambda_,
                       lambda_warmup_steps=recipe.objective.lambda_warmup_steps,
                       loss_chunk_size=recipe.objective.loss_chunk_size)
