"""DeepMind's released NFNet checkpoints (`F{0..6}_haiku.npz`) in our (timm's) layout.

The checkpoints hold haiku parameters by module path and name, e.g.

    NFNet/~/stem_conv0          w (3, 3, 3, 16) HWIO, gain (16,), bias (16,)
    NFNet/~/nf_block_3/~/conv1b w, gain, bias       (block 0 is `nf_block`, then nf_block_1, ...)
    NFNet/~/nf_block_3/~/squeeze_excite/~/linear    w (in, out) IO, b
    NFNet/~/nf_block_3          skip_gain ()
    NFNet/~/final_conv, NFNet/~/linear (the classifier, w IO and b)

(module names from `nfnets/nfnet.py` and haiku's naming; the mapping below was checked against the
converter of benjs/nfnets_pytorch, which loads F0-F5 strictly, and against timm's dm_nfnet names).
Two containers are read: a flat `.npz` archive whose keys are `<module>/<param>` (or the dotted
form of DeepMind's `utils.flatten_haiku_tree`), and the nested pickle DeepMind actually ships
under the .npz name (`{module: {param: array}}`, written with dill). The pickle is read with a
restricted unpickler that builds only numpy arrays and plain containers, never arbitrary objects:
a checkpoint cannot run code here (the same rule as torch.load(weights_only=True)).
"""
from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from pipeline.variants import VARIANTS

_CONV = {"conv0": "conv1", "conv1": "conv2", "conv1b": "conv2b", "conv2": "conv3",
         "conv_shortcut": "downsample.conv"}
_SE = {"linear": "attn_last.fc1", "linear_1": "attn_last.fc2"}


class DeepMindCheckpointError(ValueError):
    """The file is not a DeepMind NFNet checkpoint we can read; the message says why."""


def _parts(key: str) -> tuple[str, ...]:
    """'NFNet/~/nf_block_3/~/conv1b/w' or 'NFNet.nf_block_3.conv1b.w' -> the path's names."""
    return tuple(p for p in re.split(r"/~/|/|\.", key) if p and p != "~")


def read_params(path: str | os.PathLike) -> dict[tuple[str, ...], np.ndarray]:
    """{(module names..., param): array} from a flat npz or DeepMind's nested pickle."""
    path = Path(path)
    if not path.is_file():
        raise DeepMindCheckpointError(f"{path} not found")
    if zipfile.is_zipfile(path):                  # read from the file: F6's is ~1.8 GB
        with np.load(path, allow_pickle=False) as npz:
            return {_parts(k): npz[k] for k in npz.files}
    try:
        with path.open("rb") as f:
            tree = _SafeUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise DeepMindCheckpointError(f"{path}: not a DeepMind checkpoint ({e})") from None
    if not isinstance(tree, dict):
        raise DeepMindCheckpointError(f"{path}: expected a mapping of modules, got "
                                      f"{type(tree).__name__}")
    flat = {}
    for module, params in tree.items():
        if not isinstance(params, dict):
            raise DeepMindCheckpointError(f"{path}: module {module!r} holds "
                                          f"{type(params).__name__}, not parameters")
        for name, value in params.items():
            flat[_parts(f"{module}/{name}")] = np.asarray(value)
    return flat


class _SafeUnpickler(pickle.Unpickler):
    """Builds numpy arrays, dtypes and plain containers; refuses every other global."""
    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict"),
                ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple")}
    # haiku's immutable mappings of older releases: read as plain dicts
    _MAPPINGS = {("haiku._src.data_structures", "FlatMapping"),
                 ("haiku._src.data_structures", "FlatMap")}

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if (module, name) in self._MAPPINGS:
            return dict
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays and "
                                     f"mappings are read from a checkpoint)")


def block_count(params: dict[tuple[str, ...], np.ndarray]) -> int:
    return len({p[1] for p in params if len(p) > 2 and p[1].startswith("nf_block")})


def infer_variant(params: dict[tuple[str, ...], np.ndarray]) -> str:
    """The NFNet variant with this many blocks and this final width (F0..F7 by depth, FN+ by
    width; our tiny test net too)."""
    blocks = block_count(params)
    final = params.get(("NFNet", "final_conv", "w"))
    for name, v in VARIANTS.items():
        if v.family != "nfnet" or sum(v.depths) != blocks:
            continue
        features = v.arch_overrides.get("num_features", 2 * v.widths[-1])
        if final is None or final.shape[-1] == features:
            return name
    raise DeepMindCheckpointError(f"no NFNet variant has {blocks} blocks with this width "
                                  f"(known: F0-F7 and FN+)")


def _block_names(depths: tuple[int, ...]) -> list[tuple[str, str]]:
    """(haiku block module, timm prefix) in order: nf_block, nf_block_1, ... -> stages.s.i."""
    out, k = [], 0
    for s, d in enumerate(depths):
        for i in range(d):
            out.append(("nf_block" if k == 0 else f"nf_block_{k}", f"stages.{s}.{i}"))
            k += 1
    return out


def _convert(param: str, value: np.ndarray, linear_as_conv: bool = False) -> torch.Tensor:
    t = torch.from_numpy(np.array(value, dtype=np.float32, order="C"))      # keeps 0-d arrays 0-d
    if param == "w" and t.ndim == 4:                       # conv HWIO -> OIHW
        return t.permute(3, 2, 0, 1).contiguous()
    if param == "w" and t.ndim == 2:                       # linear IO -> OI (1x1 conv for SE)
        t = t.t().contiguous()
        return t[:, :, None, None] if linear_as_conv else t
    if param == "gain" and t.ndim == 1:
        return t.view(-1, 1, 1, 1)
    return t


def to_timm_state(params: dict[tuple[str, ...], np.ndarray], depths: tuple[int, ...]
                  ) -> dict[str, torch.Tensor]:
    """DeepMind's parameters as a timm dm_nfnet state dict (names and layouts)."""
    names = {"w": "weight", "gain": "gain", "bias": "bias", "b": "bias"}
    blocks = dict(_block_names(depths))
    state: dict[str, torch.Tensor] = {}
    for key, value in params.items():
        if key[0] != "NFNet" or len(key) < 3:
            raise DeepMindCheckpointError(f"unexpected parameter {'/'.join(key)}")
        module, param = key[1:-1], key[-1]
        if module[0].startswith("stem_conv"):
            prefix = f"stem.conv{int(module[0][len('stem_conv'):]) + 1}"
        elif module[0] in ("final_conv",):
            prefix = "final_conv"
        elif module == ("linear",):
            prefix = "head.fc"
        elif module[0] in blocks:
            prefix = blocks[module[0]]
            if len(module) == 1 and param == "skip_gain":
                state[f"{prefix}.skipinit_gain"] = _convert(param, value)
                continue
            if len(module) == 2 and module[1] in _CONV:
                prefix = f"{prefix}.{_CONV[module[1]]}"
            elif len(module) == 3 and module[1] == "squeeze_excite" and module[2] in _SE:
                state[f"{prefix}.{_SE[module[2]]}.{names[param]}"] = _convert(param, value, True)
                continue
            else:
                raise DeepMindCheckpointError(f"unexpected parameter {'/'.join(key)}")
        else:
            raise DeepMindCheckpointError(f"unexpected parameter {'/'.join(key)} (a block beyond "
                                          f"the variant's {sum(depths)}?)")
        if param not in names:
            raise DeepMindCheckpointError(f"unexpected parameter {'/'.join(key)}")
        state[f"{prefix}.{names[param]}"] = _convert(param, value)
    return state
