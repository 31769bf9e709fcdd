"""`tear-lora` verbs: thin wrappers that parse arguments and call the library.

argparse (stdlib) rather than typer/click: nested verbs and a repeatable `--set` need nothing more, and it
keeps the dependency list to what training needs. User errors (bad recipe, bad data) exit with status 2 and
a one-paragraph message, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from .data import DataError
from .model import ModelLoadError
from .recipe import RecipeError, load_recipe

USER_ERRORS = (RecipeError, DataError, ModelLoadError)


def _recipe_args(parser: argparse.ArgumentParser, positional: bool = True) -> None:
    if positional:
        parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a recipe value, e.g. --set objective.lambda=0.5 (repeatable)")


def cmd_recipe_validate(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    from .train import check_training_args

    for note in check_training_args(recipe):
        print(f"note: {note}")
    print(f"{args.recipe}: ok (run '{recipe.output.run_name}', lambda={recipe.lambda_}, model {recipe.model.name_or_path})")
    return 0


def cmd_recipe_show(args) -> int:
    print(load_recipe(args.recipe, args.overrides).to_yaml(), end="")
    return 0


def cmd_data_prepare(args) -> int:
    from .data import prepare
    from .model import load_tokenizer_for

    recipe = load_recipe(args.recipe, args.overrides)
    prepared = prepare(args.raw, load_tokenizer_for(recipe), recipe, out_dir=args.out,
                       skip_invalid=args.skip_invalid or None)
    m = prepared.manifest
    print(f"{args.raw}: {m['rows_kept']} rows kept, {m['rows_rejected']} rejected, {m['rows_trimmed']} trimmed "
          f"-> {prepared.out_dir}")
    for name, stats in m["tokens"].items():
        print(f"  {name:9s} tokens: min {stats['min']}, mean {stats['mean']}, p95 {stats['p95']}, max {stats['max']}")
    if m["rows_rejected"]:
        print(f"  rejected rows (verbatim) in {prepared.out_dir / 'rejects.jsonl'}", file=sys.stderr)
    return 0


def cmd_train(args) -> int:
    from .train import run

    recipe = load_recipe(args.recipe, args.overrides)
    run(recipe, resume=True if args.resume == "latest" else args.resume)
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
    p.add_argument("--out", help="output dir (default: data/processed/<raw file stem>)")
    p.add_argument("--skip-invalid", action="store_true", help="skip bad rows (written verbatim to rejects.jsonl)")
    _recipe_args(p, positional=False)
    p.set_defaults(func=cmd_data_prepare)

    p = verbs.add_parser("train", help="train an adapter -> adapters/<run_name>/")
    _recipe_args(p)
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CKPT",
                   help="continue the newest checkpoint of this run (or the given checkpoint dir)")
    p.set_defaults(func=cmd_train)
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
