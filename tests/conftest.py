"""Shared fixtures and the one subprocess helper every test uses to run real scripts.

- `run(cmd, ...)`: any command, as a user would type it (captured, with a timeout; asserts the
  exit code unless `check=False`).
- `run_stage(stage, ...)`: `python stages/<stage>.py ...`.
- `stage_main(stage, argv)`: a stage's main() in this process (no start-up cost); its exit code.
- `run_stage_in_process(stage, ...)`: `run_stage` through `stage_main`, output captured: for the
  set-up runs of a test whose process boundary is not what it tests.
- `torchrun(nproc, script, ...)`: a real `torch.distributed.run --standalone` launch (gloo on CPU).
- `copy_project(dst)`: a fresh clone-like copy of the project (tracked and unignored files,
  committed to a new git repo), for `dvc repro` runs that must not touch the checkout.
- fixtures: the demo digits as image folders and as real shards, built once per session.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pipeline.model_config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GIT_ENV = {"GIT_AUTHOR_NAME": "ci", "GIT_AUTHOR_EMAIL": "ci@example.com",
           "GIT_COMMITTER_NAME": "ci", "GIT_COMMITTER_EMAIL": "ci@example.com"}
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def run(cmd: Sequence[str], *, cwd: Path | None = None, env: dict | None = None,
        timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command with the test environment (+ `env`); on failure with `check`, the assertion
    shows the command and the tails of both streams."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "DVC_NO_ANALYTICS": "1", **GIT_ENV,
                **(env or {})}
    cmd = [str(c) for c in cmd]
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n"
                             f"{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def run_stage(stage: str, *args: str, env: dict | None = None, timeout: int = 600,
              check: bool = True) -> subprocess.CompletedProcess:
    """Run a real stage script in a subprocess, as a user would."""
    return run([sys.executable, ROOT / "stages" / f"{stage}.py", *args], env=env,
               timeout=timeout, check=check)


def stage_main(stage: str, argv: Sequence[str]) -> int:
    """Run `stages/<stage>.py`'s main(argv) in this process (no interpreter start-up: the imports
    are paid once per session) and return its exit code; errors exit through
    pipeline.cli.fail as SystemExit."""
    import importlib.util
    name = f"stage_{stage}"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, ROOT / "stages" / f"{stage}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    try:
        return module.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1


def reset_accelerator_state() -> None:
    """Forget accelerate's process-wide state, so that the next accelerator (a stage run in this
    process, a test's own) is built from scratch."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_stage_in_process(stage: str, *args: str, check: bool = True, threads: int | None = None
                         ) -> subprocess.CompletedProcess:
    """`run_stage` without the interpreter start-up (about 7 s of imports a call on a 2-core CI
    machine): the stage's main() in this process, its stdout and stderr captured; `threads` sets
    torch's intra-op threads for the run (OMP_NUM_THREADS for a subprocess). Runs that test
    signals, environment variables or bit-identity with a subprocess use `run_stage`."""
    import contextlib
    import io

    import torch

    out, err = io.StringIO(), io.StringIO()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads or before)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = stage_main(stage, [str(a) for a in args]) or 0
    finally:                                  # the next run builds its own accelerator state
        torch.set_num_threads(before)
        reset_accelerator_state()
    p = subprocess.CompletedProcess([stage, *map(str, args)], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"stages/{stage}.py {' '.join(map(str, args))} failed ({code}):\n"
                             f"{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def torchrun(nproc: int, script: str | Path, *args: str, env: dict | None = None,
             timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc_per_node N <script> ...`, one thread
    per process (2 cores)."""
    script = Path(script)
    if not script.is_absolute():
        script = ROOT / script
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}", script, *args],
               env={**ONE_THREAD, **(env or {})}, timeout=timeout, check=check)


def copy_project(dst: Path, skip: Sequence[str] = ()) -> Path:
    """The project's tracked and unignored files (less paths starting with `skip`, and less the
    run outputs git does not ignore, `runs/*/metrics.json` of a local `dvc repro`), copied to
    `dst` and committed to a new git repo: what a fresh clone holds."""
    skip = (*skip, "runs/")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file() and not f.startswith(tuple(skip)):
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    run(["git", "init", "-q"], cwd=dst)
    run(["git", "add", "-A"], cwd=dst)
    run(["git", "commit", "-qm", "copy"], cwd=dst)
    return dst


# ------------------------------------------------------------------------------------------------
# Model folders and published folders (tests of export, hub, publish)
# ------------------------------------------------------------------------------------------------

LABELS = ["5", "6", "7", "8", "9"]


def files_in(folder: Path) -> set[str]:
    """Every file under `folder`, as relative posix paths."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def publish_section(*overrides: str):
    """The demo recipe's publish section (with dotted overrides)."""
    from pipeline.recipe import load_recipe
    return load_recipe(ROOT / "recipes" / "demo.yaml", list(overrides)).publish


def tiny_config(crop_pct: float | None = None, **lineage) -> ModelConfig:
    """config.json of the tiny NFNet on LABELS as the demo's finetune stage writes it (train
    32 px, test 40 px, squash; crop_pct None: squash's default)."""
    from pipeline.model_config import ModelConfig
    from pipeline.variants import build_model
    model, arch, args = build_model("tiny", len(LABELS), device="meta")
    return ModelConfig.for_training(model, architecture=arch, model_args=args,
                                    class_names=LABELS, train_res=32, test_res=40,
                                    crop_pct=crop_pct, crop_mode="squash", interpolation="bicubic",
                                    lineage={"variant": "tiny", **lineage})


def tiny_model_dir(folder: Path, seed: int = 0) -> Path:
    """A tiny NFNet model folder as the finetune stage of the demo writes it (tiny_config, crop
    1.0), untrained; its EMA weights differ from the raw ones."""
    from pipeline.model_dir import save_model_dir
    from pipeline.variants import build_model
    model, _, _ = build_model("tiny", len(LABELS), seed=seed)
    ema, _, _ = build_model("tiny", len(LABELS), seed=seed + 1)
    return save_model_dir(folder, model, ema, tiny_config(1.0, recipe="demo"))


def tiny_pretrain_job(section, shards: Path, out: Path, **kw):
    """`training_job` for the tiny NFNet pretraining on 5 classes (tested at 32 px, crop 1.0)."""
    from pipeline.model_config import ModelConfig, Preprocessing
    from pipeline.variants import build_model
    model, arch, args = build_model("tiny", 5, seed=section.seed)
    config = ModelConfig(architecture=arch, model_args=args, num_classes=5,
                         pretrained_cfg=Preprocessing(test_input_size=(3, 32, 32), crop_pct=1.0))
    return training_job("pretrain", section, model, config, shards, out, **kw)


def training_job(stage: str, section, model, config: ModelConfig, shards: Path, out: Path, **kw):
    """A pipeline.train.Job from shards on disk, made the way the training stages make it
    (pipeline/train_cli.py): the splits, the plan, the identity, config.json's run facts."""
    from pipeline import resume, runtime, train
    from pipeline.data.manifest import load_split, read_manifest, split_name
    from pipeline.plan import make_plan
    split = load_split(shards, "train")
    has_val = split_name(read_manifest(shards)["splits"], "val") is not None
    val = load_split(shards, "val") if has_val else None
    plan = make_plan(section, split.num_samples, runtime.num_processes())
    identity = resume.Identity(stage, resume.settings(section), tuple(split.urls),
                               tuple(split.shard_lengths), kw.pop("init_fingerprint", ""))
    config = config.with_lineage(stage=stage, step=plan.total_steps,
                                 fingerprint=identity.fingerprint)
    return train.Job(stage, section, model, config, split, val, plan, identity, out, **kw)


@pytest.fixture(scope="session")
def demo_raw(tmp_path_factory) -> Path:
    from pipeline.data.demo import write_digits
    out = tmp_path_factory.mktemp("demo") / "raw"
    write_digits(out, size=48)
    return out


@pytest.fixture(scope="session")
def demo_shards(demo_raw, tmp_path_factory) -> dict[str, Path]:
    """{'pretrain': shards of digits 0-4, 'finetune': shards of digits 5-9}, 64 samples a shard."""
    root = tmp_path_factory.mktemp("shards")
    out = {}
    for part in ("pretrain", "finetune"):
        out[part] = root / part
        run_stage("shard", "--recipe", str(ROOT / "recipes" / "demo.yaml"), "--source",
                  str(demo_raw / part), "--out", str(out[part]), "--workers", "1", "--quiet",
                  "shard.shard_size=64", "shard.max_size=48")
    return out


@pytest.fixture
def small_filesystem(tmp_path):
    """`mount(size)`: a folder on a new filesystem of `size` (e.g. "3m") to fill for real: a
    tmpfs, else a loop-mounted ext2 image; unmounted at the end. Needs root (CAP_SYS_ADMIN):
    skipped with the reason otherwise."""
    mounted: list[Path] = []

    def mount(size: str, name: str = "fs") -> Path:
        folder = tmp_path / name
        folder.mkdir()
        tries = [["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]]
        image = tmp_path / f"{name}.img"
        if shutil.which("mkfs.ext2"):
            tries.append(["sh", "-c", f"truncate -s {size} {image} && mkfs.ext2 -q -m 0 {image} "
                                      f"&& mount -o loop {image} {folder}"])
        errors = []
        for cmd in tries:
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode == 0:
                mounted.append(folder)
                return folder
            errors.append(p.stderr.strip() or f"{cmd[0]} exited {p.returncode}")
        pytest.skip(f"cannot mount a small filesystem to fill (needs root or CAP_SYS_ADMIN): "
                    f"{'; '.join(errors)}")

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(folder: Path, leave: int) -> None:
    """Fill `folder`'s filesystem with one file, leaving `leave` bytes free."""
    free = shutil.disk_usage(folder).free
    with open(folder / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


# ------------------------------------------------------------------------------------------------
# The unit lane: `pytest --unit` leaves out the tests marked integration, on top of the default
# `-m 'not slow and not gpu'` (a second `-m "not integration"` would replace that one, not add to
# it). The same as `pytest -m "not integration and not slow and not gpu"`.
# ------------------------------------------------------------------------------------------------

def pytest_addoption(parser):
    parser.addoption("--unit", action="store_true",
                     help="the unit lane: leave out the tests marked integration (CONTRIBUTING.md)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--unit"):
        kept, dropped = [], []
        for item in items:
            (dropped if item.get_closest_marker("integration") else kept).append(item)
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = kept
