"""Shared command-line plumbing for the stage scripts: the same flags and errors everywhere.

The training stages' own flags (data, output, resume, dry run) are in pipeline/train_cli.py, so
that the shard stage imports nothing of the training engine (nor torch).
"""
from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from pipeline.recipe import Recipe, RecipeError, load_recipe


def stage_parser(doc: str, recipe_required: bool = True) -> argparse.ArgumentParser:
    """A parser with `--recipe` and trailing `section.key=value` overrides; the stage's docstring
    is its description."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", required=recipe_required, help="recipe YAML, e.g. recipes/demo.yaml")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value",
                    help="override recipe keys, e.g. pretrain.epochs=2 (values read as YAML)")
    return ap


def fail(message: str, code: int = 2) -> NoReturn:
    """Print `error: <message>` to stderr and exit with `code` (2: bad input, before any work)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def load_recipe_or_exit(path: str, overrides: list[str]) -> Recipe:
    try:
        return load_recipe(path, overrides)
    except RecipeError as e:
        fail(str(e))
