"""Ablation runs: one real pretrain-stage run per cell, read back as plain data, and its status.

`run_pretrain` runs the pretrain stage script it is given (behind a launcher: python, or
accelerate launch) unless the run folder already holds a finished run with the same recipe,
shards and overrides (`is_done`), so a sweep resumes and grows cell by cell. The library does not
know where the stage scripts live: the ablation scripts (which know the repository's layout) pass
the path. `read_run` and `divergence` turn a finished folder into a table row's raw material.
"""
from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from pipeline.model_config import CONFIG_NAME, ModelConfig

CHANCE_MARGIN = 5.0        # top-1 within this many points of chance counts as "at chance"


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def read_run(run: str | Path) -> dict[str, Any]:
    """A pretrain/finetune output folder: its resolved recipe section, derived values,
    metrics.json (None if the run left none) and the class count of its model (None if the run
    left no model)."""
    run = Path(run)
    resolved_path = run / "recipe.resolved.yaml"
    if not resolved_path.is_file():
        raise FileNotFoundError(f"{run} has no recipe.resolved.yaml: not a training run folder")
    resolved = yaml.safe_load(resolved_path.read_text())
    stage = "pretrain" if "pretrain" in resolved else "finetune"
    metrics_path = run / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    config = ModelConfig.load(run / "model") if (run / "model" / CONFIG_NAME).is_file() else None
    return {"run": str(run), "stage": stage, "section": resolved[stage],
            "derived": resolved.get("resolved", {}), "metrics": metrics,
            "num_classes": config.num_classes if config else None}


def divergence(metrics: dict | None, num_classes: int | None) -> str:
    """'ok', 'diverged' (non-finite loss/NLL or skipped non-finite steps), 'at chance' or
    'missing' (no metrics.json)."""
    if metrics is None:
        return "missing"
    nll = metrics.get("val_nll_ema", metrics.get("val_nll_raw"))
    if (not _finite(metrics.get("train_loss")) or (nll is not None and not _finite(nll))
            or metrics.get("skipped_steps", 0) > 0):
        return "diverged"
    top1 = metrics.get("val_top1_ema", metrics.get("val_top1_raw"))
    if num_classes and top1 is not None and top1 <= 100.0 / num_classes + CHANCE_MARGIN:
        return "at chance"
    return "ok"


def pretrain_command(launcher: str, script: str | Path, recipe: str, shards: str, out: Path,
                     overrides: list[str]) -> list[str]:
    """The pretrain stage's command line: `launcher` (`python` is this interpreter, or e.g.
    `accelerate launch --multi_gpu --num_processes 8`), then `script` (stages/pretrain.py).
    `--resume matching`: a cell whose settings changed (the sweep's overrides) starts beside its
    old checkpoints, as the sweep means it to, instead of being refused (pipeline/resume.py)."""
    words = shlex.split(launcher)
    if words in (["python"], ["python3"]):
        words = [sys.executable]
    return [*words, str(script), "--resume", "matching", "--recipe", recipe, "--shards",
            str(shards), "--out", str(out), *overrides]


def is_done(run: Path, recipe: str, shards: str, overrides: list[str]) -> bool:
    """A finished run of exactly these settings: metrics.json written, and the resolved recipe
    names the same recipe file, shards and overrides."""
    resolved = run / "recipe.resolved.yaml"
    if not (run / "metrics.json").is_file() or not resolved.is_file():
        return False
    doc = yaml.safe_load(resolved.read_text())
    return (doc.get("recipe") == recipe and doc.get("overrides") == list(overrides)
            and str(doc.get("resolved", {}).get("shards")) == str(shards))


def _log(text: str) -> None:
    print(text, flush=True)                # a stage's log under DVC is a pipe: show it as it comes


def run_pretrain(launcher: str, script: str | Path, recipe: str, shards: str, out: Path,
                 overrides: list[str], log: Callable[[str], None] = _log) -> str:
    """Run one cell (`script`: the pretrain stage) unless it is done; 'done', 'ran' or
    'failed (exit N)'. A failed cell is a result too (the table shows it), so the sweep goes on."""
    if is_done(out, recipe, shards, overrides):
        log(f"[ablation] {out}: done with these settings, kept")
        return "done"
    cmd = pretrain_command(launcher, script, recipe, shards, out, overrides)
    log(f"[ablation] {' '.join(shlex.quote(c) for c in cmd)}")
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail = "\n".join(line for line in p.stdout.splitlines()[-14:] if "it/s" not in line)
    log(tail)
    return "ran" if p.returncode == 0 else f"failed (exit {p.returncode})"
