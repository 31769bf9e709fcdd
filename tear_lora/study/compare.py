"""`tear-lora compare` and `tear-lora sweep`: adapters of different λ on one 4-bit base, side by side.

The point of a λ sweep is the trade-off curve: how much response quality (response NLL) each unit of λ buys
in consequence prediction (witness NLL). All adapters are loaded onto one base and switched with
`set_adapter`, so the comparison costs one base load, not one per adapter, and every adapter is measured on
bit-identical base weights. The time this saves is reckoned from this run's own base load (measured), not
from a second load: loading the whole base again only to report the saving would cost what it reports.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tear_lora.adapters import AdapterSet
from tear_lora.data.prepare import DataError
from tear_lora.data.readers import capped_lines
from tear_lora.metadata import METADATA_FILE, read_metadata
from tear_lora.recipe import RecipeError
from tear_lora.rundir import RunDirError, atomic_save_figure, load_json

from .evaluate import format_table, source_rows
from .generate import DEFAULT_MAX_NEW_TOKENS, Sampling, format_generated, generate_triple


def read_prompts(path: str | Path) -> list[dict]:
    """Inputs to generate for: .jsonl (objects with `input`, optional `response`) or .txt (one input per line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: prompts file not found")
    prompts = []
    with open(path, "rb") as f:  # streamed, each line capped (readers.capped_lines), as every data reader is
        for number, data, problem, _ in capped_lines(f):
            if problem:
                raise DataError(f"{path}:{number}: {problem}")
            try:
                line = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{number}: not valid UTF-8 ({e.reason})") from None
            prompts.append(_prompt(path, number, line))
    prompts = [p for p in prompts if p is not None]
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def _prompt(path: Path, number: int, line: str) -> dict | None:
    """One line of a prompts file as {"input", "response"?}, None for a blank line."""
    line = line.removesuffix("\r")
    if not line.strip():
        return None
    if path.suffix != ".jsonl":
        return {"input": line.strip()}
    try:
        item = load_json(line, f"{path}:{number}")
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{number}: invalid JSON ({e.msg})") from None
    if not isinstance(item, dict) or not isinstance(item.get("input"), str) or not item["input"].strip():
        raise DataError(f"{path}:{number}: expected an object with a non-empty string 'input'")
    return {"input": item["input"], "response": item.get("response")}


def _by_lambda(row: dict) -> tuple:
    return (row["kind"] == "base", row["lambda"] if row["lambda"] is not None else 0.0, row["name"])


def measure_switching(adapters: AdapterSet) -> dict:
    """Milliseconds per `set_adapter` (measured) against the seconds of this run's one base load, and the
    difference for N adapters: one base load per adapter would cost N - 1 more of them."""
    switches = []
    for label in adapters.labels:
        started = time.perf_counter()
        adapters.use(label)
        switches.append(time.perf_counter() - started)
    n, switch_s = len(adapters.labels), sum(switches) / len(switches)
    return {"adapters": n, "base_load_s": adapters.base_load_s, "adapter_load_s": adapters.adapter_load_s,
            "switch_ms": 1000 * switch_s, "saved_s": (n - 1) * adapters.base_load_s - n * switch_s}


def plot_nll(rows: list[dict], out: str | Path) -> Path:
    """Response and witness NLL against λ (base as dashed lines), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    adapters = sorted((r for r in rows if r["kind"] == "adapter"), key=_by_lambda)
    lambdas = [r["lambda"] for r in adapters]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, marker, color in (("response_nll", "o", "tab:blue"), ("witness_nll", "s", "tab:orange")):
        ax.plot(lambdas, [r[key] for r in adapters], marker=marker, color=color, label=key.replace("_nll", " NLL"))
        for base in (r for r in rows if r["kind"] == "base"):
            ax.axhline(base[key], color=color, linestyle="--", linewidth=1, label=f"base {key.replace('_nll', '')}")
    ax.set_xlabel("λ (weight of the witness loss)")
    ax.set_ylabel("NLL, nats per token (eval set)")
    ax.set_title("Response vs witness NLL across λ")
    ax.grid(alpha=0.3)
    ax.legend()
    out = atomic_save_figure(fig, out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


def compare(adapter_dirs: list[str | Path], data_file: str | Path, prompts_file: str | Path | None = None,
            plot: str | Path | None = None, base: str | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
            batch_size: int = 8, trust_remote_code: bool = False, skip_invalid: bool | None = None) -> dict:
    """Eval rows sorted by λ (base last), generations per prompt per adapter, timing, and the plot's path.
    `skip_invalid` None: the adapters' recipe's data.skip_invalid, as eval."""
    adapters = AdapterSet(adapter_dirs[0], base, trust_remote_code)
    for path in adapter_dirs[1:]:
        adapters.add(path)
    rows = sorted(source_rows(adapters, data_file, batch_size, skip_invalid=skip_invalid), key=_by_lambda)
    generations = []
    sampling = Sampling(max_new_tokens=max_new_tokens)
    for prompt in read_prompts(prompts_file) if prompts_file else []:
        outputs = {}
        for row in (r for r in rows if r["kind"] == "adapter"):
            adapters.use(row["name"])
            outputs[row["name"]] = generate_triple(adapters.model, adapters.tokenizer, prompt["input"],
                                                   prompt.get("response"), sampling).as_dict()
        generations.append({"input": prompt["input"], "outputs": outputs})
    return {"rows": rows, "generations": generations, "timing": measure_switching(adapters),
            "plot": str(plot_nll(rows, plot)) if plot else None}


def format_report(report: dict, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> str:
    from .generate import Generated

    lambdas = {r["name"]: r["lambda"] for r in report["rows"]}
    parts = [format_table(report["rows"])]
    for i, item in enumerate(report["generations"], start=1):
        parts.append(f"\n#### prompt {i}")
        for name, out in item["outputs"].items():
            parts.append(f"--- {name} (λ={lambdas[name]:g}) ---\n" + format_generated(Generated(**out), max_new_tokens))
    t = report["timing"]
    parts.append(f"\nbase load {t['base_load_s']:.2f} s (once); "
                 f"set_adapter switch {t['switch_ms']:.3f} ms; for {t['adapters']} adapters one shared base saves "
                 f"{t['saved_s']:.2f} s vs reloading the base per adapter")
    if report["plot"]:
        parts.append(f"plot: {report['plot']}")
    return "\n".join(parts)


# ---- sweep ----------------------------------------------------------------------------------------------------


def parse_lambdas(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise RecipeError(f"--lambdas {text!r}: expected comma-separated numbers, e.g. 0,0.5,1,2") from None
    if not values or any(v < 0 for v in values):
        raise RecipeError(f"--lambdas {text!r}: expected one or more numbers >= 0")
    return list(dict.fromkeys(values))


def sweep_recipes(recipe_path: str | Path, lambdas: list[float], overrides: list[str] | None = None) -> list:
    """One recipe per λ, run name `<run_name>-lambda<λ>`."""
    from tear_lora.recipe import load_recipe

    run_name = load_recipe(recipe_path, overrides).output.run_name
    return [load_recipe(recipe_path, [*(overrides or []), f"objective.lambda={lam}",
                                      f"output.run_name={run_name}-lambda{lam:g}"]) for lam in lambdas]


def trained_from(metadata: dict, recipe) -> bool:
    """Was this finished run trained from `recipe`? (recipe.hash() leaves out `output`, so overwrite and the
    run's location do not count.)"""
    return metadata.get("recipe_sha256") == recipe.hash()


def train_sweep(recipes: list) -> list[Path]:
    """Train what is missing: finished runs of the same recipe are reused, checkpointed ones resumed.

    A finished run of another recipe (its tear_lora.json records a different recipe_sha256) is never reused
    silently: it is retrained when output.overwrite is true (the old run stays until the new one is done),
    refused otherwise."""
    from tear_lora.train.runner import latest_checkpoint, run

    dirs = []
    for recipe in recipes:
        run_dir = recipe.run_dir()
        if (run_dir / METADATA_FILE).exists():
            metadata = read_metadata(run_dir)
            if trained_from(metadata, recipe):
                print(f"sweep: {run_dir} is complete, skipping", file=sys.stderr)
                dirs.append(run_dir)
                continue
            what = (f"{run_dir} was trained from recipe {metadata.get('recipe_sha256')}, but this sweep's recipe "
                    f"for it is {recipe.hash()}")
            if not recipe.output.overwrite:
                raise RunDirError(f"sweep: {what}; pass --set output.overwrite=true to retrain it (the old run is "
                                  "kept until the new one has finished), or use another output.run_name")
            print(f"sweep: {what}: retraining it (output.overwrite is true)", file=sys.stderr)
            run(recipe)
        elif latest_checkpoint(run_dir):
            print(f"sweep: resuming {run_dir} from {latest_checkpoint(run_dir).name}", file=sys.stderr)
            run(recipe, resume=True)
        else:
            if run_dir.exists():  # an unfinished run with no complete checkpoint: nothing to resume
                print(f"sweep: {run_dir} is unfinished with no checkpoint, starting it over", file=sys.stderr)
                recipe.output.overwrite = True
            run(recipe)
        dirs.append(run_dir)
    return dirs


def sweep(recipe_path: str | Path, lambdas: list[float], overrides: list[str] | None = None,
          prompts_file: str | Path | None = None, plot: str | Path | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> dict:
    """Train one adapter per λ (resumable), then compare them on the recipe's eval set."""
    from tear_lora.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    if not recipe.data.eval_file:
        raise RecipeError(f"{recipe_path}: data.eval_file is needed to compare the sweep's adapters")
    dirs = train_sweep(sweep_recipes(recipe_path, lambdas, overrides))
    plot = plot or Path(recipe.output.dir) / f"{recipe.output.run_name}-sweep.png"
    eval_file = recipe.data.eval_file
    # these adapters were trained from the user's own recipe: its trust_remote_code is the user's decision
    return compare(dirs, eval_file, prompts_file, plot, max_new_tokens=max_new_tokens,
                   trust_remote_code=recipe.model.trust_remote_code)
