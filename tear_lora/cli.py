"""`tear-lora` verbs: thin wrappers that parse arguments and call the library.

argparse (stdlib) rather than typer/click: nested verbs and a repeatable `--set` need nothing more, and it
keeps the dependency list to what training needs. User errors (bad recipe, bad data) exit with status 2 and
a one-paragraph message, never a traceback.

Longer than 350 lines because it is the one table of verbs: each `cmd_*` is a few lines that call one module,
and the parser beside them is the `--help` a user reads; split apart, a verb's flags and its handler would live
in different files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tear_lora.data.prepare import DataError
from tear_lora.metadata import AdapterError
from tear_lora.recipe import RecipeError, load_recipe
from tear_lora.rundir import RunDirError, json_safe, read_json
from tear_lora.study.generate import DEFAULT_MAX_NEW_TOKENS
from tear_lora.train.model import ModelLoadError

USER_ERRORS = (RecipeError, DataError, ModelLoadError, AdapterError, RunDirError)


def _recipe_args(parser: argparse.ArgumentParser, positional: bool = True) -> None:
    if positional:
        parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a recipe value, e.g. --set objective.lambda=0.5 (repeatable)")


def cmd_recipe_validate(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    from tear_lora.train.runner import check_training_args

    for note in check_training_args(recipe):
        print(f"note: {note}")
    print(f"{args.recipe}: ok (run '{recipe.output.run_name}', lambda={recipe.lambda_}, model {recipe.model.name_or_path})")
    return 0


def cmd_recipe_show(args) -> int:
    print(load_recipe(args.recipe, args.overrides).to_yaml(), end="")
    return 0


def cmd_data_prepare(args) -> int:
    from tear_lora.data.prepare import prepare
    from tear_lora.train.model import load_tokenizer_for

    recipe = load_recipe(args.recipe, args.overrides)
    # pack as training will (data.packing packs the training file only), so `train` finds this very cache
    packed = recipe.data.packing and Path(args.raw).resolve() == Path(recipe.data.train_file).resolve()
    prepared = prepare(args.raw, load_tokenizer_for(recipe), recipe, out_dir=args.out,
                       skip_invalid=args.skip_invalid or None, packed=packed, overwrite=args.overwrite)
    m = prepared.manifest
    print(f"{args.raw}: {m['rows_kept']} rows kept, {m['rows_rejected']} rejected, {m['rows_trimmed']} trimmed "
          f"-> {prepared.out_dir}")
    for name, stats in m["tokens"].items():
        print(f"  {name:9s} tokens: min {stats['min']}, mean {stats['mean']}, p95 {stats['p95']}, max {stats['max']}")
    if m["rows_rejected"]:
        print(f"  rejected rows (line, reason, excerpt) in {prepared.out_dir / 'rejects.jsonl'}", file=sys.stderr)
    return 0


def _training(job, rerun: str = "") -> int:
    """Run a job that trains: exit 0 trained, 4 training fault (NaN/Inf, disk full), 143/130 stopped by
    SIGTERM/SIGINT, each as one line (the newest good checkpoint named), never a traceback."""
    from tear_lora.train.distributed import teardown
    from tear_lora.train.runner import Interrupted, TrainingFault

    try:
        job()
    except (TrainingFault, Interrupted) as e:
        print(f"{'stopped' if isinstance(e, Interrupted) else 'error'}: {e}{rerun}", file=sys.stderr)
        return e.exit_code
    finally:
        teardown()  # under torchrun / accelerate launch: leave the process group cleanly
    return 0


def cmd_train(args) -> int:
    from tear_lora.train.runner import run

    recipe = load_recipe(args.recipe, args.overrides)
    return _training(lambda: run(recipe, resume=True if args.resume == "latest" else args.resume, force=args.force))


def cmd_plan(args) -> int:
    from tear_lora.train.plan import format_plan, plan

    recipe = load_recipe(args.recipe, args.overrides)
    result = plan(recipe, nproc=args.nproc)
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_plan(result, recipe))
    return 0


def _emit(payload, as_json: bool, text) -> None:
    """JSON (NaN/Inf as null: bare NaN is not JSON), or the human-readable `text()` (only built when wanted)."""
    print(json.dumps(json_safe(payload), indent=2, ensure_ascii=False, allow_nan=False) if as_json else text())


def _read_json(path: str, flag: str):
    try:
        return read_json(path)
    except (OSError, ValueError) as e:
        raise DataError(f"{flag} {path}: unreadable JSON ({e})") from None


def cmd_merge(args) -> int:
    """Exit 0 merged (and verified), 2 user error, 3 verify beyond tolerance (the merge or any GGUF)."""
    from tear_lora.release.gguf_verify import describe
    from tear_lora.release.merge import all_passed, merge
    from tear_lora.release.verify import describe_bounds

    out = merge(args.adapter, args.out, args.base_weights, args.dtype, args.base, args.trust_remote_code,
                verify_rows=args.rows if args.verify else None, verify_data=args.data, gguf=args.gguf,
                overwrite=args.overwrite)
    print(f"merged {args.adapter} into the {args.base_weights} base ({args.dtype}) -> {out}")
    for path in sorted(out.glob("*.gguf")):
        print(f"  GGUF {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if (out / "Modelfile").exists():
        print(f"  Ollama: cd {out} && ollama create <name> -f Modelfile   (llama.cpp commands: {out}/README.md)")
    if not args.verify:
        return 0
    r = read_json(out / "verify.json")  # verified inside the merge, before the output was marked complete
    print(f"verify, {r['rows']} rows / {r['positions']} positions: max |Δlogit| {r['max_abs_logit']:.3g}, mean KL "
          f"{r['mean_kl']:.3g}, top-1 agreement {r['top1_agreement']:.4f}: "
          f"{'within' if r['passed'] else 'BEYOND'} tolerance: {describe_bounds(r['tolerance'], r.get('floor'))}")
    for g in (r.get("gguf") or {}).values():
        print(f"verify GGUF {describe(g)}")
    return 0 if all_passed(r) else 3


def cmd_bundle(args) -> int:
    """Exit 0 written (and verified), 2 user error, 3 verify beyond tolerance (an adapter or a GGUF)."""
    from tear_lora.release.bundle import bundle
    from tear_lora.release.verify import describe_bounds

    out = bundle(args.adapters, args.out, gguf=args.gguf, dtype=args.dtype, base=args.base,
                 trust_remote_code=args.trust_remote_code, verify_rows=args.rows if args.verify else None,
                 verify_data=args.data, overwrite=args.overwrite)
    manifest = read_json(out / "bundle.json")
    print(f"bundle of {len(manifest['adapters'])} adapters -> {out} (base {out / manifest['base']}"
          + (f", {out / manifest['base_gguf']}" if manifest["base_gguf"] else "") + ")")
    for e in manifest["adapters"]:
        print(f"  {e['name']} (lambda {e['lambda']}): {out / e['peft_dir']}" + (f", {out / e['gguf']}" if e["gguf"] else ""))
    print(f"  serving commands: {out / 'README.md'}" + (f"; or: tear-lora serve {out}" if manifest["base_gguf"] else ""))
    if not args.verify:
        return 0
    r = read_json(out / "verify.json")  # verified in the build dir, before the marker
    for name, check in r["adapters"].items():
        gguf = check.get("gguf")
        print(f"verify {name}, {r['rows']} rows / {check['positions']} positions vs the adapter on its 4-bit base: "
              f"max |Δlogit| {check['max_abs_logit']:.3g}, mean KL {check['mean_kl']:.3g}, top-1 "
              f"{check['top1_agreement']:.4f}: {'within' if check['passed'] else 'BEYOND'} tolerance"
              + (f"; LoRA GGUF max |Δ| {gguf['max_abs']:.3g}: {'passed' if gguf['passed'] else 'FAILED'}" if gguf else ""))
    print(f"verify tolerance: {describe_bounds(r['tolerance'], r.get('floor'))}")
    if r.get("base_gguf"):
        from tear_lora.release.gguf_verify import describe

        print(f"verify base GGUF {describe(r['base_gguf'])}")
    return 0 if r["passed"] else 3


def cmd_serve(args) -> int:
    """Exit 130 / 143 once stopped by SIGINT / SIGTERM (llama-server stopped and waited for), 2 user error."""
    from tear_lora.release.bundle_manifest import read_bundle
    from tear_lora.release.llama_server import serve

    return serve(args.bundle, read_bundle(args.bundle), args.host, args.port, args.api_key, args.api_key_file)


def _gguf_outtypes(value: str) -> list[str]:
    from tear_lora.release.gguf import parse_outtypes

    try:
        return parse_outtypes(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _sampling_value(field: str, cast):
    """An argparse type that checks one Sampling field with Sampling's own rule (exit 2 before any model loads)."""
    def parse(text: str):
        from tear_lora.study.generate import Sampling

        try:
            value = cast(text)
            Sampling(**{field: value})
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value
    return parse


def cmd_generate(args) -> int:
    from tear_lora.adapters import open_source
    from tear_lora.study.generate import Sampling, format_generated, generate_triple

    source = open_source(args.source, args.base, args.trust_remote_code)
    out = generate_triple(source.model, source.tokenizer, args.input, args.response,
                          Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed))
    _emit(out.as_dict(), args.json, lambda: format_generated(out, args.max_new_tokens))
    return 0


def cmd_eval(args) -> int:
    from tear_lora.study.evaluate import evaluate, format_table

    rows = evaluate(args.sources, args.data, args.base, args.batch_size, args.trust_remote_code,
                    args.skip_invalid or None)
    _emit(rows, args.json, lambda: format_table(rows))
    return 0


def cmd_compare(args) -> int:
    from tear_lora.study.compare import compare, format_report

    report = compare(args.adapters, args.data, args.prompts, args.plot, args.base, args.max_new_tokens, args.batch_size,
                     args.trust_remote_code, args.skip_invalid or None)
    _emit(report, args.json, lambda: format_report(report, args.max_new_tokens))
    return 0


def cmd_sweep(args) -> int:
    from tear_lora.study.compare import format_report, parse_lambdas, sweep

    lambdas, report = parse_lambdas(args.lambdas), {}

    def job():
        report.update(sweep(args.recipe, lambdas, args.overrides, args.prompts, args.plot, args.max_new_tokens))

    code = _training(job, rerun=" (or run the same sweep again: finished runs are kept, this one resumes)")
    if code == 0:
        _emit(report, args.json, lambda: format_report(report, args.max_new_tokens))
    return code


def _verify_args(p: argparse.ArgumentParser, compared: str, default_data: str) -> None:
    """--verify / --data / --rows, as merge and bundle share them."""
    p.add_argument("--verify", action="store_true", help=f"{compared}; exit 3 beyond tolerance")
    p.add_argument("--data", help=f"triples for --verify (default: {default_data})")
    p.add_argument("--rows", type=int, default=16, help="rows for --verify (default 16)")


def _skip_invalid_arg(p: argparse.ArgumentParser) -> None:
    """eval, compare and analyze read --data as training does (the source's recipe: data.skip_invalid); this overrides it."""
    p.add_argument("--skip-invalid", action="store_true", help="skip bad rows of --data, counting them and naming "
                   "the first few on stderr (default: the source's data.skip_invalid)")


def _release_args(p: argparse.ArgumentParser, base: bool = True, gen: bool = False, report: bool = True) -> None:
    if base:
        p.add_argument("--base", help="local copy of the base the adapter was trained on (default: its recipe's)")
        p.add_argument("--trust-remote-code", action="store_true", help="allow the base / model to run its own "
                       "Python code (auto_map); never taken from an adapter's or merged dir's files (default: off)")
    if gen:
        p.add_argument("--max-new-tokens", type=_sampling_value("max_new_tokens", int), default=DEFAULT_MAX_NEW_TOKENS,
                       help=f"per span (default {DEFAULT_MAX_NEW_TOKENS})")
    if report:
        p.add_argument("--json", action="store_true", help="machine-readable output")


def cmd_analyze(args) -> int:
    from tear_lora.study.analyze import Settings, analyze
    from tear_lora.study.analyze_report import format_analysis, plot_analysis
    from tear_lora.study.study_report import check_report_dir, write_report

    layers = [int(v) for v in args.layers.split(",")] if args.layers else None
    settings = Settings(folds=args.folds, seed=args.seed, bootstrap=args.bootstrap, draws=args.draws, layers=layers,
                        batch_size=args.batch_size)
    if args.report:  # refused before any model loads, as every verb that writes a directory
        check_report_dir(args.report, args.overwrite)
    report = analyze(args.sources, args.data, settings, args.base, args.trust_remote_code, args.skip_invalid or None)
    if args.report:
        report["report"] = str(write_report(report, args.report, args.overwrite))
    if args.plot:
        report["plot"] = str(plot_analysis(report, args.plot))
    _emit(report, args.json, lambda: format_analysis(report) + (f"\nplot: {report['plot']}" if args.plot else ""))
    return 0


def cmd_split_domains(args) -> int:
    from tear_lora.data.splits import domain_split

    summary = domain_split(args.files, args.hold_out.split(","), args.out, overwrite=args.overwrite)
    _emit(summary, args.json, lambda: "\n".join(
        f"{s['source']}: {s['in']['rows']} rows in -> {s['in']['path']}, {s['out']['rows']} held out -> "
        f"{s['out']['path']}" for s in summary))
    return 0


def cmd_report(args) -> int:
    from tear_lora.study.report import plot_training_curves, summary_table

    eval_rows = _read_json(args.eval_json, "--eval-json") if args.eval_json else None
    verify = _read_json(args.verify_json, "--verify-json") if args.verify_json else None
    print(summary_table(args.adapter, eval_rows, verify))
    print(f"  training curves: {plot_training_curves(args.adapter, args.plot)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tear-lora", description="QLoRA adapters that learn to respond and to "
                                     "predict consequences: loss = response + lambda * witness.")
    verbs = parser.add_subparsers(dest="verb", required=True)

    recipe = verbs.add_parser("recipe", help="check or print a recipe").add_subparsers(dest="action", required=True)
    p = recipe.add_parser("validate", help="check a recipe (keys, types, values, training arguments)")
    _recipe_args(p)
    p.set_defaults(func=cmd_recipe_validate)
    p = recipe.add_parser("show", help="print the resolved recipe (defaults and --set applied)")
    _recipe_args(p)
    p.set_defaults(func=cmd_recipe_show)

    data = verbs.add_parser("data", help="prepare training data").add_subparsers(dest="action", required=True)
    p = data.add_parser("prepare", help="raw triples -> tokenized dataset + manifest in data/processed/")
    p.add_argument("raw", help="raw triples: .jsonl, .csv, .parquet or a saved HF dataset dir")
    p.add_argument("--recipe", required=True, help="recipe whose model tokenizer and data settings to use")
    p.add_argument("--out", help="output dir (default: data/processed/<raw file stem>-<hash of source, tokenizer and data settings>)")
    p.add_argument("--skip-invalid", action="store_true", help="skip bad rows (listed in rejects.jsonl)")
    p.add_argument("--overwrite", action="store_true", help="replace an --out that holds an earlier, finished "
                   "`data prepare` output (anything else there is never replaced)")
    _recipe_args(p, positional=False)
    p.set_defaults(func=cmd_data_prepare)

    p = verbs.add_parser("train", help="train an adapter -> adapters/<run_name>/")
    _recipe_args(p)
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CKPT",
                   help="continue the newest checkpoint of this run (or the given checkpoint dir)")
    p.add_argument("--force", action="store_true", help="train even if the memory plan says it will not fit the GPU")
    p.set_defaults(func=cmd_train)

    p = verbs.add_parser("plan", help="estimate peak GPU memory of a recipe before anything loads")
    _recipe_args(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="processes per node training together: the peak per rank (DDP, or FSDP with "
                   "distributed.fsdp: true)")
    p.set_defaults(func=cmd_plan)

    p = verbs.add_parser("merge", help="adapter -> standalone model dir (plain transformers can load it)")
    p.add_argument("adapter", help="adapter dir (adapters/<run>)")
    p.add_argument("--out", required=True, help="output dir: new, empty, or (with --overwrite) a previous "
                   "complete merge output, replaced only once the new one is complete")
    p.add_argument("--overwrite", action="store_true", help="replace an --out holding a finished merge output")
    p.add_argument("--base-weights", choices=("dequantized", "original"), default="dequantized",
                   help="dequantized: the NF4 weights it was trained on (default, reproduces the trained model); "
                   "original: the unquantized weights (differs by the quantization error)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="export dtype (default bf16)")
    _verify_args(p, "compare logits with 4-bit base + adapter", "the recipe's eval file")
    p.add_argument("--gguf", type=_gguf_outtypes, default=[], metavar="TYPE[,TYPE]",
                   help="also write <run>-<TYPE>.gguf for llama.cpp / Ollama (f16, bf16, q8_0; comma-separated) "
                   "with llama.cpp's converter, and an Ollama Modelfile for the first; --verify checks each "
                   "against the merged weights (needs pip install 'tear_lora[gguf]')")
    _release_args(p, report=False)
    p.set_defaults(func=cmd_merge)

    p = verbs.add_parser("bundle", help="adapters of one base -> one serving base + a plain LoRA per adapter "
                         "(llama-server, vLLM: every lambda on one server, chosen per request)")
    p.add_argument("adapters", nargs="+", help="adapter dirs trained on one base (adapters/<run>)")
    p.add_argument("--out", required=True, help="output dir: new, empty, or (with --overwrite) a previous "
                   "bundle (replaced only once the new one is complete)")
    p.add_argument("--overwrite", action="store_true", help="replace an --out holding a finished bundle (anything "
                   "else there is never replaced)")
    p.add_argument("--gguf", choices=("f16", "q8_0"), help="also write the base and each LoRA as llama.cpp GGUF "
                   "(needs the [gguf] extra and scripts/build_llama_server.sh for llama.cpp's LoRA converter)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="serving base dtype (default bf16)")
    _verify_args(p, "each adapter's serving base + LoRA vs the adapter on its 4-bit base, and the GGUFs read back",
                 "the first adapter's eval file")
    _release_args(p, report=False)
    p.set_defaults(func=cmd_bundle)

    p = verbs.add_parser("serve", help="run llama-server on a bundle: every adapter loaded, chosen per request")
    p.add_argument("bundle", help="a `tear-lora bundle --gguf` output dir")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key-file", help="file holding the key clients must send (Authorization: Bearer); needed "
                   "for a --host beyond this machine")
    p.add_argument("--api-key", help="the key itself (visible in your shell history: prefer --api-key-file)")
    p.set_defaults(func=cmd_serve)

    p = verbs.add_parser("generate", help="generate a response, then its witness (or only the witness)")
    p.add_argument("source", help="adapter dir or merged model dir")
    p.add_argument("--input", required=True, help="the input text")
    p.add_argument("--response", help="a given response: only the witness is predicted")
    p.add_argument("--seed", type=int, help="random seed (sampling)")
    p.add_argument("--temperature", type=_sampling_value("temperature", float),
                   help="sample with this temperature; 0 = greedy (default: greedy)")
    p.add_argument("--top-p", type=_sampling_value("top_p", float), help="sample with nucleus top-p in (0, 1] "
                   "(default: greedy)")
    _release_args(p, gen=True)
    p.set_defaults(func=cmd_generate)

    p = verbs.add_parser("eval", help="per-span NLL / perplexity of adapters or merged models, and the base")
    p.add_argument("sources", nargs="+", help="adapter dirs and/or merged model dirs")
    p.add_argument("--data", required=True, help="held-out triples (.jsonl, .csv, .parquet, dataset dir)")
    p.add_argument("--batch-size", type=int, default=8)
    _skip_invalid_arg(p)
    _release_args(p)
    p.set_defaults(func=cmd_eval)

    p = verbs.add_parser("compare", help="adapters of different lambda on one base: table, generations, plot")
    p.add_argument("adapters", nargs="+", help="adapter dirs (same base)")
    p.add_argument("--data", required=True, help="held-out triples")
    p.add_argument("--prompts", help="inputs to generate for: .jsonl ({\"input\": ...}) or .txt (one per line)")
    p.add_argument("--plot", help="write a PNG of response and witness NLL against lambda")
    p.add_argument("--batch-size", type=int, default=8)
    _skip_invalid_arg(p)
    _release_args(p, gen=True)
    p.set_defaults(func=cmd_compare)

    p = verbs.add_parser("sweep", help="train one adapter per lambda (resumable), then compare them")
    _recipe_args(p)
    p.add_argument("--lambdas", required=True, help="comma-separated, e.g. 0,0.5,1,2")
    p.add_argument("--prompts", help="inputs for side-by-side generations")
    p.add_argument("--plot", help="PNG path (default: <output.dir>/<run_name>-sweep.png)")
    _release_args(p, base=False, gen=True)
    p.set_defaults(func=cmd_sweep)

    p = verbs.add_parser("analyze", help="does the witness depend on the response? matching, sensitivity, probe")
    p.add_argument("sources", nargs="+", help="adapter dirs (one shared base) and/or merged model dirs")
    p.add_argument("--data", required=True, action="append", help="triples file (repeatable); witness matching "
                   "needs contrast pairs (meta.pair), the probe meta.valence, sensitivity meta.domain")
    p.add_argument("--plot", help="write a PNG of the three instruments against lambda")
    p.add_argument("--folds", type=int, default=5, help="probe cross-validation folds (default 5)")
    p.add_argument("--seed", type=int, default=0, help="mismatch draw, folds, label shuffle, bootstrap (default 0)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for 95%% intervals")
    p.add_argument("--draws", type=int, default=1000, help="permutation / sign-flip draws for every null (default "
                   "1000)")
    p.add_argument("--report", help="directory for the JSON, tables and plots (built whole, then swapped in)")
    p.add_argument("--overwrite", action="store_true", help="replace a --report directory of an earlier analyze")
    p.add_argument("--layers", help="probe layers, e.g. 0,6,12 (0 = embeddings; default: every layer)")
    p.add_argument("--batch-size", type=int, default=8)
    _skip_invalid_arg(p)
    _release_args(p)
    p.set_defaults(func=cmd_analyze)

    p = verbs.add_parser("split-domains", help="cut triple files by meta.domain: train on some, measure on the rest")
    p.add_argument("files", nargs="+", help="triple files; each gives <out>/<stem>.in.jsonl and <stem>.out.jsonl")
    p.add_argument("--hold-out", required=True, help="comma-separated meta.domain values to hold out, e.g. code,health")
    p.add_argument("--out", required=True, help="directory for the split files (built whole, then swapped in)")
    p.add_argument("--overwrite", action="store_true", help="replace an --out that holds an earlier, finished "
                   "split (anything else there is never replaced)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_split_domains)

    p = verbs.add_parser("report", help="summary table and training-curve PNG of a run")
    p.add_argument("adapter", help="adapters/<run> directory")
    p.add_argument("--eval-json", help="output of `tear-lora eval ... --json`")
    p.add_argument("--verify-json", help="verify.json from `tear-lora merge --verify`")
    p.add_argument("--plot", help="PNG path (default: <adapter>/training_curves.png)")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
