"""Shared fixtures: the demo digits as image folders and as real shards, built once per session."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_stage(stage: str, *args: str, env: dict | None = None, timeout: int = 600,
              check: bool = True) -> subprocess.CompletedProcess:
    """Run a real stage script in a subprocess, as a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    p = subprocess.run([sys.executable, str(ROOT / "stages" / f"{stage}.py"), *args],
                       capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and p.returncode != 0:
        raise AssertionError(f"stages/{stage}.py {' '.join(args)} failed ({p.returncode}):\n"
                             f"{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


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
