"""The pinned F-variant recipes against the paper's table and against each other."""
import json

import pytest

from conftest import ROOT, run_stage
from pipeline.plan import make_plan
from pipeline.recipe import load_recipe, to_dict
from pipeline.variants import VARIANTS, get_variant

# The paper / DeepMind table, written out independently of pipeline/variants.py:
# depths, train px, test px, RandAugment magnitude, dropout, params (M)
PAPER = {
    "f0": ((1, 2, 6, 3), 192, 256, 5, 0.2, 71.5),
    "f1": ((2, 4, 12, 6), 224, 320, 10, 0.3, 132.6),
    "f2": ((3, 6, 18, 9), 256, 352, 10, 0.4, 193.8),
    "f3": ((4, 8, 24, 12), 320, 416, 15, 0.4, 254.9),
    "f4": ((5, 10, 30, 15), 384, 512, 15, 0.5, 316.1),
    "f5": ((6, 12, 36, 18), 416, 544, 15, 0.5, 377.2),
    "f6": ((7, 14, 42, 21), 448, 576, 15, 0.5, 438.4),
    "f7": ((8, 16, 48, 24), 480, 608, 15, 0.5, 499.5),
}
F = sorted(PAPER)
VARIANT_KEYS = {"name", "description", "shard.max_size", "publish.model_name",
                "pretrain.model.variant", "pretrain.model.drop_rate", "pretrain.train_res",
                "pretrain.test_res", "pretrain.micro_batch", "pretrain.sam_rho",
                "pretrain.augment.randaugment_magnitude", "finetune.train_res",
                "finetune.test_res", "finetune.micro_batch"}


def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.fixture(scope="module")
def recipes():
    return {name: load_recipe(ROOT / "recipes" / f"{name}.yaml") for name in F}


@pytest.mark.parametrize("name", F)
def test_variant_table_matches_the_paper(name):
    depths, train, test, mag, drop, params = PAPER[name]
    v = get_variant(name)
    assert (v.depths, v.train_res, v.test_res, v.randaugment_layers, v.randaugment_magnitude,
            v.drop_rate, v.params_m) == (depths, train, test, 4, mag, drop, params)


@pytest.mark.parametrize("name", F)
def test_recipe_pins_the_papers_imagenet_recipe(recipes, name):
    r, v = recipes[name], VARIANTS[name]
    p = r.pretrain
    assert p.model.variant == name and p.model.drop_rate == v.drop_rate
    assert (p.train_res, p.test_res) == (v.train_res, v.test_res)
    assert (p.augment.randaugment_layers, p.augment.randaugment_magnitude) == (4, v.randaugment_magnitude)
    assert (p.global_batch, p.lr_base, p.epochs, p.warmup_epochs) == (4096, 0.1, 360, 5)
    assert (p.clip_factor, p.agc_eps, p.weight_decay, p.label_smoothing) == (0.01, 1e-3, 2e-5, 0.1)
    assert (p.ema_decay, p.model.drop_path_rate, p.augment.mixup_alpha) == (0.99999, 0.25, 0.2)
    assert p.momentum == 0.9 and p.nesterov and p.lr_batch_scaling
    assert p.sam_rho == (0.05 if name in ("f5", "f6") else None)
    f = r.finetune
    assert f.train_res > p.train_res and f.test_res == v.test_res       # higher resolution
    assert (f.steps, f.warmup_steps, f.global_batch, f.lr_base, f.weight_decay) == \
        (15000, 5000, 2048, 0.1, 1e-5)
    assert (f.model.drop_rate, f.model.drop_path_rate, f.sam_rho) == (0.25, 0.1, 0.05)
    assert not f.lr_batch_scaling and f.init.head_init == "zeros"
    for section in (p, f):                # the per-GPU batch splits the global batch on 1-64 GPUs
        for gpus in (1, 8, 64):
            plan = make_plan(section, 1281167, gpus)
            assert plan.micro_batch * gpus * plan.accum_steps == section.global_batch


def test_shared_keys_are_identical_across_f0_to_f7(recipes):
    flats = {name: flat(to_dict(r)) for name, r in recipes.items()}
    keys = set(flats["f0"])
    assert all(set(f) == keys for f in flats.values())
    shared = keys - VARIANT_KEYS
    for key in sorted(shared):
        values = {name: f[key] for name, f in flats.items()}
        assert len({json.dumps(v) for v in values.values()}) == 1, f"{key} differs: {values}"
    assert "pretrain.lr_base" in shared and "finetune.sam_rho" in shared


def test_every_number_has_a_source_comment():
    import yaml
    operational = {"seed", "width", "log_every", "keep_checkpoints", "calibration_bins", "workers"}
    for name in F + ["f4plus"]:
        for line in (ROOT / "recipes" / f"{name}.yaml").read_text().splitlines():
            s = line.split("#")[0].strip()
            if not s or ":" not in s or s.startswith("-"):
                continue
            key, value = s.split(":", 1)
            parsed = yaml.safe_load(value) if value.strip() else None
            numeric = isinstance(parsed, (int, float)) and not isinstance(parsed, bool) or (
                isinstance(parsed, list) and parsed and all(isinstance(x, (int, float)) for x in parsed))
            if numeric and key.strip() not in operational:
                assert "#" in line, f"recipes/{name}.yaml: '{s}' has no source comment"


def test_f4plus_is_the_large_scale_recipe():
    r = load_recipe(ROOT / "recipes" / "f4plus.yaml")
    p = r.pretrain
    assert p.model.variant == "f4+" and p.train_res == 224 and p.epochs == 20
    assert p.weight_decay == 1e-6 and p.ema_decay is None
    assert p.augment.randaugment_layers == 0 and p.augment.mixup_alpha == 0 == p.augment.cutmix_alpha
    assert r.finetune.train_res > p.train_res and r.finetune.sam_rho == 0.05


@pytest.mark.integration
@pytest.mark.parametrize("name,stage", [("f0", "pretrain"), ("f4plus", "finetune"),
                                        pytest.param("f6", "pretrain", marks=pytest.mark.slow)])
def test_dry_run_json_without_shards(name, stage):
    extra = ["--init", "none:f0"] if stage == "finetune" else []    # F0: quick to build on a CPU
    p = run_stage(stage, "--recipe", str(ROOT / "recipes" / f"{name}.yaml"), *extra,
                  "--dry-run", "json", "--processes", "8", timeout=300)
    plan = json.loads(p.stdout.strip().splitlines()[-1])
    if stage == "pretrain":
        assert plan["total_steps"] == 112602 and plan["lr"] == pytest.approx(1.6)
        assert plan["warmup_steps"] == pytest.approx(1563.9246, abs=1e-4)
        assert plan["global_batch"] == 4096 and plan["images_per_step"] == 8192
        assert plan["accum_steps"] == 4096 // (8 * plan["micro_batch_per_device"])
    else:
        assert plan["total_steps"] == 15000 and plan["lr"] == 0.1 and "2 forward-backward" in plan["sam"]
    if name == "f0":
        assert plan["parameters"] == 71_489_284
        assert plan["train_gflops_per_image"] == pytest.approx(60.4, abs=0.1)
    assert {"clip_factor", "augmentation", "ema_decay", "micro_batch_per_device"} <= set(plan)
