"""The shape of the code: the import graph of pipeline/ has no cycle, and every DVC stage depends
on exactly the project files its script runs (so editing the model card never marks pretraining
stale, and editing the reader never re-shards)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

PIPELINE = ROOT / "pipeline"


def module_file(name: str) -> Path | None:
    """The file of a `pipeline...` module name, or None for anything else."""
    if not name.startswith("pipeline"):
        return None
    path = ROOT / Path(*name.split("."))
    for cand in (path.with_suffix(".py"), path / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def imports_of(path: Path) -> set[Path]:
    """Project modules `path` imports anywhere in its body (module level or inside functions)."""
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            f = module_file(name)
            if f is not None and f != path:
                found.add(f)
    return found


def closure(path: Path) -> set[Path]:
    """`path` and every project module it reaches through imports."""
    seen, todo = set(), [path]
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo += imports_of(p)
    return seen


def test_pipeline_has_no_import_cycle():
    graph = {p: imports_of(p) for p in PIPELINE.rglob("*.py")}
    state: dict[Path, str] = {}

    def visit(p: Path, path: list[Path]) -> None:
        state[p] = "open"
        for q in sorted(graph[p]):
            if state.get(q) == "open":
                cycle = path[path.index(q):] + [q]
                pytest.fail("import cycle: " + " -> ".join(str(c.relative_to(ROOT)) for c in cycle))
            if q not in state:
                visit(q, path + [q])
        state[p] = "done"

    for p in sorted(graph):
        if p not in state:
            visit(p, [p])


def _code_deps(deps: list[str]) -> set[str]:
    """The deps entries that are project code (pipeline/ files and folders, stages/ scripts)."""
    return {d for d in deps if d.startswith(("pipeline", "stages/"))}


def _expand(entries: set[str]) -> set[str]:
    """Folders listed as deps stand for the .py files and templates under them."""
    out = set()
    for e in entries:
        p = ROOT / e
        if p.is_dir():
            out |= {str(f.relative_to(ROOT)) for f in p.rglob("*") if f.suffix in (".py", ".md")}
        else:
            out.add(e)
    return out


def _stage_code(script: str) -> set[str]:
    files = {str(p.relative_to(ROOT)) for p in closure(ROOT / script)}
    if "pipeline/model_card.py" in files:          # the card's text is a file of its own
        files.add("pipeline/templates/model_card.md")
    return files


def _script_of(cmd: str) -> str:
    words = cmd.split()
    if "-m" in words:
        return words[words.index("-m") + 1].replace(".", "/") + ".py"
    return next(w for w in words if w.endswith(".py"))


@pytest.mark.parametrize("stage", ["demo_data", "shard", "pretrain", "finetune", "evaluate",
                                   "publish"])
def test_each_dvc_stage_depends_on_exactly_the_code_it_runs(stage):
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    spec = spec.get("do", spec)
    listed = _expand(_code_deps(spec["deps"]))
    needed = _stage_code(_script_of(spec["cmd"]))
    assert listed == needed, (f"dvc.yaml stage {stage}: missing {sorted(needed - listed)}, "
                              f"not used {sorted(listed - needed)}")
