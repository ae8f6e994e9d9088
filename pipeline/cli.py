"""Shared command-line plumbing for the stage scripts: the same flags and errors everywhere."""
from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from pipeline.recipe import Recipe, RecipeError, load_recipe


def stage_parser(doc: str) -> argparse.ArgumentParser:
    """A parser with `--recipe` and trailing `section.key=value` overrides."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", required=True, help="recipe YAML, e.g. recipes/demo.yaml")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value",
                    help="override recipe keys, e.g. pretrain.epochs=2 (values read as YAML)")
    return ap


def fail(message: str, code: int = 2) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def load_recipe_or_exit(path: str, overrides: list[str]) -> Recipe:
    try:
        return load_recipe(path, overrides)
    except RecipeError as e:
        fail(str(e))
