"""What a training run does with its output folder: continue a checkpoint, start, or nothing.

A run's *settings* are its recipe section less the keys that may change across a resume
(`MAY_CHANGE_ON_RESUME`: they change how the work is split or reported, not the result), its
training data (shard names and sizes) and its initial weights. They make the checkpoint folder's
name (`checkpoints/<fingerprint>/`) and are stored in every checkpoint's meta.json, so that a run
with other settings can be told which keys differ.

`decide` reads the folder (on the first process) for `--resume`:
    auto      the newest complete checkpoint of these settings; when the folder holds
              checkpoints of other settings only, refuse (Refused: exit 2) naming each key that
              differs, rather than start over silently
    matching  the same, except that other settings' checkpoints do not stop it: it starts
              beside them (what `dvc repro` runs: DVC re-runs a stage because its parameters
              changed, and keeps each experiment's results itself)
    none      start from step 0; the checkpoints of these settings (and a PREEMPTED.json that
              names one of them) are removed first, those of other settings kept
    <folder>  that checkpoint, which must hold these settings
A newest checkpoint at the last step with a `finished/` record is a finished run: nothing to
train. The record (metrics.json, config.json, dvclive/, recipe.resolved.yaml as the run left
them) lets the same command put a finished run's outputs back when something removed or
replaced them (`dvc repro -f`, `dvc exp run` of another recipe and back), without training.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import checkpoint as ckpt
from pipeline.files import atomic_dir, atomic_write_bytes
from pipeline.recipe import TrainSection, to_dict

# The recipe keys that may change across a resume (the one list; the README repeats it): how the
# global batch is split into micro-batches (so a run can resume on more or fewer GPUs), the
# loader, logging, trackers, checkpointing, compilation and precision, the NaN policy.
MAY_CHANGE_ON_RESUME = ("micro_batch", "log_every", "checkpoint_every", "keep_checkpoints",
                        "loader", "trackers", "compile", "channels_last", "precision",
                        "nan_policy")
PREEMPTED = "PREEMPTED.json"      # written when a signal stopped the run
FINISHED = "finished"             # a final checkpoint's record of the run's outputs
OUTPUTS = ("metrics.json", "recipe.resolved.yaml")      # files of <out> kept in the record


class Refused(RuntimeError):
    """The folder's checkpoints cannot be continued with these settings (exit 2)."""


def settings(section: TrainSection) -> dict[str, Any]:
    """The recipe keys that change the run's result: all but MAY_CHANGE_ON_RESUME."""
    d = to_dict(section)
    for k in MAY_CHANGE_ON_RESUME:
        d.pop(k, None)
    return d


@dataclass(frozen=True)
class Identity:
    """What makes two runs the same run: stage, settings, training data, initial weights."""
    stage: str
    settings: dict[str, Any]
    urls: tuple[str, ...]
    shard_lengths: tuple[int, ...]
    init: str = ""

    @property
    def fingerprint(self) -> str:
        return ckpt.fingerprint(self.stage, self.settings, list(self.urls),
                                list(self.shard_lengths), self.init)

    def meta(self) -> dict[str, Any]:
        """The part of a checkpoint's meta.json that `differences` reads back."""
        return {"settings": self.settings, "init": self.init,
                "data": {"shards": len(self.urls), "samples": sum(self.shard_lengths),
                         "fingerprint": ckpt.fingerprint(list(self.urls),
                                                         list(self.shard_lengths))}}


def differences(identity: Identity, meta: dict[str, Any]) -> list[str]:
    """'key: checkpoint value -> this value' for each difference between a checkpoint's meta
    and these settings (dotted keys under the stage)."""
    if "settings" not in meta:
        return ["its settings (not recorded: the checkpoint was written by an older version)"]
    out = [f"{identity.stage}.{k}: {a!r} -> {b!r}"
           for k, (a, b) in _diff(meta["settings"], identity.settings).items()]
    mine = identity.meta()["data"]
    if meta.get("data", {}).get("fingerprint") != mine["fingerprint"]:
        theirs = meta.get("data", {})
        out.append(f"the training shards: {theirs.get('shards')} shards, {theirs.get('samples')} "
                   f"samples -> {mine['shards']} shards, {mine['samples']} samples")
    if meta.get("init", "") != identity.init:
        out.append(f"the initial weights (--init): {meta.get('init') or 'none'} -> "
                   f"{identity.init or 'none'}")
    return out or ["nothing recorded (the stage or the code that names the folder changed)"]


def _diff(a: Any, b: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: dict[str, tuple[Any, Any]] = {}
        for k in sorted(set(a) | set(b)):
            out.update(_diff(a.get(k), b.get(k), f"{prefix}{k}."))
        return out
    return {} if a == b else {prefix.rstrip("."): (a, b)}


# ------------------------------------------------------------------------------------------------
# The decision
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Decision:
    """`start`, `resume` (from `checkpoint`) or `finished` (at `checkpoint`); `note`: a line to
    print (the checkpoints --resume none removed)."""
    kind: str
    checkpoint: str | None = None
    note: str | None = None


def decide(out: Path, identity: Identity, mode: str, total_steps: int) -> Decision:
    """What a run with `identity` and `--resume mode` does with `out` (module docstring)."""
    root = out / "checkpoints" / identity.fingerprint
    if mode == "none":
        return Decision("start", note=_start_over(out, root))
    if mode in ("auto", "matching"):
        mine = ckpt.complete_checkpoints(root)
        if mine:
            return _continue(mine[-1], total_steps)
        others = _other_checkpoints(out, root)
        if others and mode == "auto":
            raise Refused(_refusal(out, identity, others[-1]))
        return Decision("start")
    path = find_resume(mode, root)                  # a folder: it must be a complete checkpoint
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("fingerprint") != identity.fingerprint:
        raise Refused(_refusal(out, identity, path))
    return _continue(path, total_steps)


def _continue(found: Path, total_steps: int) -> Decision:
    meta = json.loads((found / "meta.json").read_text())
    if meta.get("step") == total_steps and (found / FINISHED).is_dir():
        return Decision("finished", str(found))
    return Decision("resume", str(found))


def _other_checkpoints(out: Path, root: Path) -> list[Path]:
    """Complete checkpoints of other settings under `out`, the most recently written last."""
    found = [c for d in (out / "checkpoints").glob("*") if d.is_dir() and d != root
             for c in ckpt.complete_checkpoints(d)]
    return sorted(found, key=lambda c: (c / "meta.json").stat().st_mtime)


def _refusal(out: Path, identity: Identity, found: Path) -> str:
    meta = json.loads((found / "meta.json").read_text())
    state = ("a finished run" if (found / FINISHED).is_dir() else
             "a stopped run: PREEMPTED.json" if _marker_names(out, found.parent) else
             "an unfinished run")
    return (f"{out} holds checkpoints of other training settings (newest: {found}, step "
            f"{meta.get('step')}, {state}); continuing them with these settings would not be the "
            f"same run. What differs (checkpoint -> this run): "
            f"{'; '.join(differences(identity, meta))}. Nothing was written. To start over there, "
            f"run the same command with --resume none (those checkpoints are kept); or write to "
            f"a new --out")


def _start_over(out: Path, root: Path) -> str | None:
    """--resume none: remove this settings' checkpoints (and a marker that names one)."""
    if not root.exists():
        return None
    found, marker = ckpt.complete_checkpoints(root), _marker_names(out, root)
    shutil.rmtree(root)
    if marker:
        (out / PREEMPTED).unlink(missing_ok=True)
    if not found:
        return None
    return (f"--resume none: removed {len(found)} checkpoint(s) of these settings under {root} "
            f"(newest: step {int(ckpt.STEP_RE.match(found[-1].name).group(1))})"
            f"{' and PREEMPTED.json' if marker else ''}; training from step 0")


def _marker_names(out: Path, root: Path) -> bool:
    """Whether `<out>/PREEMPTED.json` names a checkpoint under `root` (one settings' folder)."""
    try:
        marker = json.loads((out / PREEMPTED).read_text())
    except (OSError, ValueError):
        return False
    return Path(str(marker.get("checkpoint", ""))).parent.name == root.name


def clear_marker(out: Path, root: Path) -> None:
    """A finished run removes PREEMPTED.json if it names a checkpoint of its own settings (the
    stop it continued); a marker of other settings stays for the run that resumes from it."""
    if _marker_names(out, root):
        (out / PREEMPTED).unlink(missing_ok=True)


def find_resume(mode: str, root: Path) -> Path | None:
    """The checkpoint `Trainer.resume` loads for `mode` (none, auto / matching: the newest of
    these settings, or a folder); the stages pass the folder `decide` chose."""
    if mode == "none":
        return None
    if mode in ("auto", "matching"):
        found = ckpt.complete_checkpoints(root)
        return found[-1] if found else None
    path = Path(mode)
    if not (path / "meta.json").is_file():
        raise ckpt.CheckpointError(f"--resume {mode}: not a complete checkpoint folder "
                                   f"(expected meta.json inside); complete ones under {root}: "
                                   f"{[p.name for p in ckpt.complete_checkpoints(root)]}")
    return path


# ------------------------------------------------------------------------------------------------
# A finished run's outputs
# ------------------------------------------------------------------------------------------------

def record_finished(checkpoint: Path, out: Path) -> None:
    """After a run finished: keep its outputs beside its final checkpoint (`finished/`), as
    they are now: metrics.json, recipe.resolved.yaml, model/config.json, dvclive/."""
    with atomic_dir(checkpoint / FINISHED, what="the record of the finished run") as tmp:
        for name in OUTPUTS:
            if (out / name).is_file():
                shutil.copy2(out / name, tmp / name)
        shutil.copy2(out / "model" / "config.json", tmp / "config.json")
        if (out / "dvclive").is_dir():
            shutil.copytree(out / "dvclive", tmp / "dvclive")


def outputs_differ(checkpoint: Path, out: Path) -> list[str]:
    """The outputs in `out` that are not the finished run's (missing or other)."""
    rec = checkpoint / FINISHED
    differ = [name for name in OUTPUTS if (rec / name).is_file() and _bytes(out / name) !=
              _bytes(rec / name)]
    model = out / "model"
    if (_bytes(model / "config.json") != _bytes(rec / "config.json")
            or any(_size(model / w) != _size(checkpoint / w) for w in _weights(checkpoint))):
        differ.insert(0, "model/")
    if (rec / "dvclive").is_dir() and _tree(out / "dvclive") != _tree(rec / "dvclive"):
        differ.append("dvclive/")
    return differ


def restore_outputs(checkpoint: Path, out: Path, which: list[str]) -> None:
    """Put the finished run's outputs `which` (from `outputs_differ`) back into `out`: the model
    folder from the final checkpoint's weights (the same tensors finish() saved) and the
    record's config.json; the rest from the record. Each atomically."""
    rec = checkpoint / FINISHED
    if "model/" in which:
        with atomic_dir(out / "model", what="the model folder") as tmp:
            for w in _weights(checkpoint):
                shutil.copy2(checkpoint / w, tmp / w)
            shutil.copy2(rec / "config.json", tmp / "config.json")
    for name in OUTPUTS:
        if name in which:
            atomic_write_bytes(out / name, (rec / name).read_bytes(), what=name)
    if "dvclive/" in which:
        with atomic_dir(out / "dvclive", what="the dvclive logs") as tmp:
            shutil.copytree(rec / "dvclive", tmp, dirs_exist_ok=True)


def _weights(checkpoint: Path) -> list[str]:
    return [w for w in ("model.safetensors", "ema.safetensors") if (checkpoint / w).is_file()]


def _bytes(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def _size(path: Path) -> int | None:
    return path.stat().st_size if path.is_file() else None


def _tree(folder: Path) -> dict[str, bytes]:
    if not folder.is_dir():
        return {}
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in folder.rglob("*") if p.is_file()}
