"""Signal propagation at initialisation: the NF-ResNet paper's design tool, for any model we build.

Brock, De & Smith (2021, "Characterizing signal propagation to close the performance gap in
unnormalized ResNets") design NF-ResNets with *signal propagation plots*: for the output of each
residual block, on one batch at initialisation,

    average channel squared mean   mean over channels of (mean over N, H, W)^2
    average channel variance       mean over channels of (variance over N, H, W)

(DeepMind's `signal_metrics` in nfnets/base.py, NHWC there, NCHW here; population variance).
For an NF block x_{l+1} = x_l + alpha * f(beta_l * x_l), with beta_l = 1 / sqrt(Var(x_l)) as the
network expects it, the branch has unit variance, so the variance grows by alpha^2 per block and is
reset at each transition block (first block of a stage), whose shortcut sees the normalised input:
expected Var = 1 + (j + 1) alpha^2 after block j of a stage. `predicted_variance` writes that out.

Two switches matter when reading the curves:
- DeepMind's NFNets (and timm's `dm_nfnet_*`) zero-initialise the skip gain at the end of each
  residual branch, and timm's BN ResNets zero-initialise the last BN gamma of each block
  (`zero_init_last`, Goyal et al. 2017): as built, every non-transition block is an identity at
  init and the curves are flat. The paper's analysis is of the scaled branches, so the report sets
  those gains to 1 ("branches on"; `branch_gains(model, 1.0)`) and can draw the as-built curve too.
- BN layers use batch statistics (train mode, as in the first training step) on a copy of the
  model, so running statistics are not touched; everything else runs in eval mode (no dropout, no
  stochastic depth).
"""
from __future__ import annotations

import copy
import csv
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipeline.data.loader import EvalShards
from pipeline.data.manifest import load_split
from pipeline.data.transforms import eval_transform, normalize
from pipeline.files import atomic_write_text

_BN = nn.modules.batchnorm._BatchNorm


@dataclass
class BlockSignal:
    index: int                  # block position in the network (0-based)
    stage: int                  # stage index (0-based)
    block: int                  # position in its stage; 0 = transition block
    name: str                   # module path, e.g. stages.1.0 or layer2.0
    avg_sq_mean: float
    avg_var: float
    predicted_var: float | None = None   # NF blocks: 1 + (block + 1) * alpha^2


@dataclass
class SignalCurve:
    """One model's signal propagation on one input."""
    model: str                  # label, e.g. "tiny (NFNet)"
    input: str                  # "images" or "gaussian"
    branches: str               # "on" (gains set to 1) or "as built"
    alpha: float | None      # NF residual scale; None for BN models
    blocks: list[BlockSignal] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "blocks"},
                "blocks": [asdict(b) for b in self.blocks]}


# ------------------------------------------------------------------------------------------------
# Finding residual blocks
# ------------------------------------------------------------------------------------------------

def _block_types() -> tuple[type, ...]:
    from timm.models.nfnet import NormFreeBlock
    from timm.models.resnet import BasicBlock, Bottleneck
    return NormFreeBlock, BasicBlock, Bottleneck


def residual_blocks(model: nn.Module) -> list[tuple[str, nn.Module, int, int]]:
    """(name, module, stage, position in stage) of every residual block, in forward order.

    Stages are the containers that hold the blocks (`stages.<i>` in NFNets, `layer<i>` in ResNets).
    """
    types = _block_types()
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, types)]
    if not found:
        raise ValueError(f"{type(model).__name__}: no residual blocks found; the signal report "
                         f"knows timm's {', '.join(t.__name__ for t in types)}")
    out, parents = [], {}
    for name, module in found:
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        stage = parents.setdefault(parent, len(parents))
        position = sum(1 for n, _, s, _ in out if s == stage)
        out.append((name, module, stage, position))
    return out


def branch_gains(model: nn.Module, value: float | None) -> int:
    """Set the gain that closes each residual branch: NF skip gains (skipinit_gain), or the last BN
    gamma of timm's ResNet blocks (zeroed by zero_init_last). None leaves them as built. Returns the
    number of blocks changed."""
    if value is None:
        return 0
    changed = 0
    with torch.no_grad():
        for _, block, _, _ in residual_blocks(model):
            gain = getattr(block, "skipinit_gain", None)
            if gain is None:
                bn = getattr(block, "bn3", None) or getattr(block, "bn2", None)
                gain = getattr(bn, "weight", None)
            if gain is not None:
                gain.fill_(value)
                changed += 1
    return changed


def alpha_of(model: nn.Module) -> float | None:
    alphas = {float(b.alpha) for _, b, _, _ in residual_blocks(model) if hasattr(b, "alpha")}
    return alphas.pop() if len(alphas) == 1 else None


def predicted_variance(stage_positions: Iterable[int], alpha: float) -> list[float]:
    """The NF design's expected block-output variance: reset to 1 + alpha^2 at each transition
    block, + alpha^2 for every further block of the stage."""
    return [1.0 + (p + 1) * alpha ** 2 for p in stage_positions]


# ------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------

def signal_metrics(x: torch.Tensor) -> tuple[float, float]:
    """(average channel squared mean, average channel variance) of an NCHW activation."""
    x = x.detach().float()
    dims = (0, 2, 3) if x.ndim == 4 else (0,)
    mean = x.mean(dim=dims)
    var = x.var(dim=dims, unbiased=False)
    return float((mean ** 2).mean()), float(var.mean())


@torch.no_grad()
def measure(model: nn.Module, x: torch.Tensor, label: str, input_name: str = "images",
            gains: float | None = 1.0) -> SignalCurve:
    """Signal metrics of every residual block's output for one batch `x` (normalised NCHW).

    Works on a copy: `gains` (1.0 = branches on, None = as built) and BN batch statistics never
    touch `model`.
    """
    net = copy.deepcopy(model)
    branch_gains(net, gains)
    net.eval()
    for m in net.modules():
        if isinstance(m, _BN):
            m.train()                      # batch statistics, as at the first training step
    blocks = residual_blocks(net)
    outputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: outputs.__setitem__(n, out))
             for n, m, _, _ in blocks]
    try:
        net(x.to(next(net.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    alpha = alpha_of(net)
    predicted = predicted_variance([p for _, _, _, p in blocks], alpha) if alpha else None
    curve = SignalCurve(label, input_name, "on" if gains is not None else "as built", alpha)
    for i, (name, _, stage, position) in enumerate(blocks):
        sq_mean, var = signal_metrics(outputs[name])
        curve.blocks.append(BlockSignal(i, stage, position, name, sq_mean, var,
                                        predicted[i] if predicted else None))
    return curve


def gaussian_like(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """N(0, 1) inputs of the same shape: the idealised input the NF design assumes."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape, generator=g).to(x.device)


def image_batch(shards: str | Path, split: str, count: int, res: int, crop_pct: float = 1.0,
                interpolation: str = "bicubic") -> tuple[torch.Tensor, list[int]]:
    """The first `count` images of a shard split at `res` px (eval transform: resize + centre
    crop), normalised with the ImageNet mean/std the models train with; and their labels."""
    info = load_split(shards, split)
    n = min(count, info.num_samples)
    ds = EvalShards(info, eval_transform(res, crop_pct, interpolation), rank=0, world=1,
                    workers=1, batch=n)
    batch = next(iter(ds))
    return normalize(batch.images), batch.labels.tolist()


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------

CSV_FIELDS = ["model", "input", "branches", "index", "stage", "block", "name", "avg_sq_mean",
              "avg_var", "predicted_var"]


def write_report(curves: list[SignalCurve], out: str | Path, meta: dict) -> dict[str, Path]:
    """signal.json (meta + curves), signal.csv (one row per block and curve) and signal.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "signal.json", json.dumps(
        {**meta, "curves": [c.as_dict() for c in curves]}, indent=1) + "\n")
    rows = []
    for c in curves:
        for b in c.blocks:
            rows.append({"model": c.model, "input": c.input, "branches": c.branches,
                         **{k: getattr(b, k) for k in CSV_FIELDS[3:]}})
    import io
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else (f"{v:.6g}" if isinstance(v, float) else v))
                    for k, v in r.items()})
    atomic_write_text(out / "signal.csv", buf.getvalue())
    plot(curves, out / "signal.png", meta.get("title", ""))
    return {"json": out / "signal.json", "csv": out / "signal.csv", "png": out / "signal.png"}


_STYLE = {("images", "on"): dict(ls="-", marker="o", label="real images, branches on"),
          ("images", "as built"): dict(ls="--", marker="x", label="real images, as built"),
          ("gaussian", "on"): dict(ls=":", marker="s", label="N(0,1) input, branches on"),
          ("gaussian", "as built"): dict(ls="-.", marker="+", label="N(0,1) input, as built")}


def plot(curves: list[SignalCurve], path: str | Path, title: str = "") -> None:
    """One column per model (NFNet and BN baseline side by side), rows: average channel squared
    mean and average channel variance per residual block (log scale); the NF design's prediction
    in grey; stage boundaries as vertical lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    models = list(dict.fromkeys(c.model for c in curves))
    fig, axes = plt.subplots(2, len(models), figsize=(5.5 * len(models), 7), squeeze=False)
    for col, name in enumerate(models):
        mine = [c for c in curves if c.model == name]
        ref = mine[0]
        for row, key in enumerate(("avg_sq_mean", "avg_var")):
            ax = axes[row][col]
            for c in mine:
                style = dict(_STYLE.get((c.input, c.branches), {}))
                ax.plot([b.index for b in c.blocks], [max(getattr(b, key), 1e-12) for b in c.blocks],
                        ms=4, lw=1.3, **style)
            if key == "avg_var" and ref.blocks and ref.blocks[0].predicted_var is not None:
                ax.plot([b.index for b in ref.blocks], [b.predicted_var for b in ref.blocks],
                        color="grey", lw=2, alpha=0.5,
                        label=f"NF design: 1 + (j+1) alpha^2, alpha={ref.alpha:g}")
            for b in ref.blocks:
                if b.block == 0 and b.index > 0:
                    ax.axvline(b.index - 0.5, color="k", lw=0.5, alpha=0.3)
            ax.set_yscale("log")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("residual block (vertical lines: stage transitions)")
            ax.set_ylabel({"avg_sq_mean": "average channel squared mean",
                           "avg_var": "average channel variance"}[key])
            ax.set_title(f"{name}" if row == 0 else "")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
    fig.suptitle(title or "Signal propagation at initialisation", fontsize=10)
    fig.text(0.5, 0.005, "branches on: NF skip gains and the last BN gamma of each block set to 1 "
             "(as built they are 0, so blocks start as identities); BN layers use batch statistics",
             ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.02, 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summarise(curve: SignalCurve) -> dict:
    """Per stage: the transition block's variance and the mean per-block increment after it
    (what the NF design predicts to be 1 + alpha^2 and alpha^2)."""
    stages: dict[int, list[BlockSignal]] = {}
    for b in curve.blocks:
        stages.setdefault(b.stage, []).append(b)
    out = {}
    for s, bs in stages.items():
        inc = [b2.avg_var - b1.avg_var for b1, b2 in zip(bs, bs[1:])]
        out[s] = {"transition_var": bs[0].avg_var,
                  "mean_increment": sum(inc) / len(inc) if inc else math.nan,
                  "increments": inc}
    return out
