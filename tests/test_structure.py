"""The shape of the code: the import graph of pipeline/ has no cycle, and every DVC stage depends
on exactly the project files its script runs (so editing the model card never marks pretraining
stale, and editing the reader never re-shards)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

PIPELINE = ROOT / "pipeline"
MODULES = sorted(PIPELINE.rglob("*.py"))        # pipeline/ is a namespace package: no __init__.py


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
    return {_module_of(t) for t in _imported(ast.parse(path.read_text())).values()} - {None, path}


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
    graph = {p: imports_of(p) for p in MODULES}
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


# ------------------------------------------------------------------------------------------------
# The unit lane (`pytest --unit`, CONTRIBUTING.md): fast, and still every module.
# Read statically from the test files: a test is in the lane unless it, or its file's
# `pytestmark`, carries integration, slow or gpu. What a test uses is the closure of the names
# its body (and its parameters: fixtures) reaches through the file's and conftest.py's top-level
# definitions; a project module is used when a reached name was imported from it.
# ------------------------------------------------------------------------------------------------

TESTS = ROOT / "tests"
NOT_IN_LANE = {"integration", "slow", "gpu"}
# conftest helpers that run a stage script, a training or evaluation stage in-process, torchrun,
# any other command, or a copy of the project: seconds each (interpreter start-up, a real run), so
# a test that calls one is integration. (`stage_main` stays allowed: the lane's shard-stage tests
# run it on a few images in tenths of a second; `demo_shards` too: one shard run per session, 5 s.)
RUNS_A_STAGE = {"run", "run_stage", "run_stage_in_process", "torchrun", "copy_project"}


def _mark_names(nodes: list[ast.expr]) -> set[str]:
    """The X of each `pytest.mark.X` or `pytest.mark.X(...)` in `nodes` (a test's decorators, the
    items of `pytestmark`); marks on single parameters (`pytest.param(marks=...)`) are not
    the test's."""
    out = set()
    for n in nodes:
        f = n.func if isinstance(n, ast.Call) else n
        if (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Attribute)
                and f.value.attr == "mark"):
            out.add(f.attr)
    return out


def _definitions(tree: ast.Module) -> dict[str, ast.AST]:
    """The top-level names a file defines (functions, classes, assignments) and their nodes."""
    defs: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            defs[node.name] = node
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        defs[n.id] = node
    return defs


def _imported(*nodes: ast.AST) -> dict[str, str]:
    """{name bound: the dotted thing it names} for the imports anywhere inside `nodes`. A plain
    `import a.b` binds `a`, and is kept under its full name too (a key no name can match), so
    that the modules a file imports can be read from the values."""
    out = {}
    for n in (n for node in nodes for n in ast.walk(node)):
        if isinstance(n, ast.Import):
            for a in n.names:
                out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
                out[a.name] = a.name
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            for a in n.names:
                out[a.asname or a.name] = f"{n.module}.{a.name}"
    return out


def _used_names(node: ast.AST) -> set[str]:
    """Names read in `node` (and a function's parameters, which may be fixtures), with dotted
    attribute chains (`pipeline.data.reader.Cursor`) for `import pipeline...` forms."""
    names = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            names.add(n.id)
        elif isinstance(n, ast.Attribute):
            parts = []
            cur: ast.AST = n
            while isinstance(cur, ast.Attribute):
                parts.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name):
                names.add(".".join([cur.id, *reversed(parts)]))
        elif isinstance(n, ast.arg):
            names.add(n.arg)
    return names


class _File:
    def __init__(self, path: Path):
        self.tree = ast.parse(path.read_text())
        self.defs = _definitions(self.tree)
        self.imports = _imported(*[s for s in self.tree.body
                                   if isinstance(s, ast.Import | ast.ImportFrom)])
        self.marks: set[str] = set()
        for node in self.tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "pytestmark"
                                                    for t in node.targets):
                value = node.value
                self.marks |= _mark_names(list(value.elts) if isinstance(value, ast.List | ast.Tuple)
                                          else [value])


CONFTEST = _File(TESTS / "conftest.py")
CONFTEST_FIXTURES = {n.name for n in CONFTEST.tree.body if isinstance(n, ast.FunctionDef)
                     and any("fixture" in ast.unparse(d) for d in n.decorator_list)}


def _reached(file: _File, test: ast.FunctionDef) -> set[str]:
    """The dotted names (pipeline.x.y, conftest.helper) the test reaches."""
    out: set[str] = set()
    seen: set[int] = set()
    todo: list[tuple[_File, ast.AST]] = [(file, test)]
    while todo:
        f, node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        imports = {**f.imports, **_imported(node)}
        for name in _used_names(node):
            head = name.split(".")[0]
            if head in imports:
                target = imports[head] + name[len(head):]
                out.add(target)
                if target.startswith("conftest."):
                    leaf = target.split(".")[1]
                    if leaf in CONFTEST.defs:
                        todo.append((CONFTEST, CONFTEST.defs[leaf]))
            elif name in f.defs:
                todo.append((f, f.defs[name]))
            elif name in CONFTEST_FIXTURES:                 # a conftest fixture, by parameter
                out.add(f"conftest.{name}")
                todo.append((CONFTEST, CONFTEST.defs[name]))
    return out


def unit_lane() -> dict[str, set[str]]:
    """{test file::test name: the names it reaches} for every test in the unit lane."""
    lane = {}
    for path in sorted(TESTS.glob("test_*.py")):
        f = _File(path)
        if f.marks & NOT_IN_LANE:
            continue
        for node in f.tree.body:
            if (isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
                    and not _mark_names(node.decorator_list) & NOT_IN_LANE):
                lane[f"{path.name}::{node.name}"] = _reached(f, node)
    return lane


def _module_of(dotted: str) -> Path | None:
    """The pipeline/ file a dotted name lives in (the longest module prefix)."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        found = module_file(".".join(parts[:end]))
        if found is not None:
            return found
    return None


def test_every_pipeline_module_is_used_by_a_unit_lane_test():
    """`pytest --unit` exercises every module: some test of the lane calls a name of it
    (directly, or through a helper of its file or of conftest.py), not only through a stage."""
    used = {m for names in unit_lane().values() for n in names if (m := _module_of(n))}
    missing = sorted(str(p.relative_to(ROOT)) for p in set(MODULES) - used)
    assert not missing, (f"no unit-lane test uses {missing}: add a small, fast test of it (real "
                         f"tensors, tars in tmp_path, a tiny model), not marked integration")


def test_unit_lane_tests_run_no_stage():
    """A test that runs a stage script, a training stage, torchrun, a command or a project copy
    takes seconds: it is marked integration, so the unit lane stays fast."""
    offenders = {test: sorted(n.split(".")[1] for n in names
                              if n.startswith("conftest.") and n.split(".")[1] in RUNS_A_STAGE)
                 for test, names in unit_lane().items()}
    offenders = {t: found for t, found in offenders.items() if found}
    assert not offenders, f"mark these @pytest.mark.integration: {offenders}"


def test_the_readme_layout_names_every_module():
    """README.md's Layout section has a line for every module of pipeline/ (drift check)."""
    text = (ROOT / "README.md").read_text()
    layout = text[text.index("## Layout"):text.index("## Tests")]
    missing = sorted(str(p.relative_to(ROOT)) for p in MODULES
                     if not re.search(rf"(?<![\w.]){re.escape(p.name)}", layout))
    assert not missing, f"README.md's Layout section does not name {missing}"
