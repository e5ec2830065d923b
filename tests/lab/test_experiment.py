"""Recipe plumbing: YAML + smoke section + flags into the typed config, the CordaConfig of each
method, and one method's run from build to report rows (on a tiny LLaMA, seconds)."""


import pytest
import torch
from conftest import VOCAB, text_batches, tiny_llama
from peft import PeftModel
from transformers import LlamaForCausalLM

from corda_vl import CordaError, load_results, write_report
from corda_vl.lab.eval.scores import ItemScores, read_items, token_nll
from corda_vl.lab.experiment import Recipe, Setting, calibrate_seeds, parse_recipe, results_table, run_method, settings
from corda_vl.lab.recipe_config import RecipeConfig

YAML = """
recipe: demo
model: m
methods: [lora, corda]
mode: kpm
rank: 4
budget: null
target_modules: [q_proj, down_proj]
corda: {covariance_normalization: none}
task: t
task_train_rows: 8
task_eval_rows: 4
retention: [a, b]
steps: 10
lr: 0.01
seed: 0
output_dir: out/demo
smoke:
  rank: 2
  steps: 2
"""


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(YAML)
    return path


def test_flags_override_the_smoke_section_which_overrides_the_yaml(config_file):
    _, cfg = parse_recipe("doc", config_file, [])
    assert isinstance(cfg, RecipeConfig)
    assert cfg.rank == 4 and cfg.steps == 10 and cfg.methods == ["lora", "corda"] and cfg.scale_sweep is False
    args, cfg = parse_recipe("doc", config_file, ["--smoke", "--steps", "3", "--methods", "corda, corda++",
                                                  "--retention", "a", "--scale-sweep", "--resume"])
    assert (cfg.rank, cfg.steps, cfg.methods, cfg.retention) == (2, 3, ["corda", "corda++"], ["a"])
    assert cfg.scale_sweep is True and args.resume and args.smoke and not args.dry_run
    _, cfg = parse_recipe("doc", config_file, ["--method", "pissa", "--lr", "0.5", "--mode", "ipm"])
    assert cfg.methods == ["pissa"] and cfg.lr == 0.5 and cfg.mode == "ipm"


def test_bad_methods_and_modes_are_refused(config_file):
    with pytest.raises(CordaError, match="unknown method"):
        parse_recipe("doc", config_file, ["--methods", "lora,dora"])
    with pytest.raises(CordaError, match="mode"):
        parse_recipe("doc", config_file, ["--mode", "both"])


def test_every_method_gets_the_same_targets_rank_and_scaling(config_file):
    _, cfg = parse_recipe("doc", config_file, ["--budget", "5000"])
    configs = {m: cfg.corda_config(m) for m in ("lora", "pissa", "corda", "corda++")}
    assert {(c.r, c.alpha, tuple(c.target_modules)) for c in configs.values()} == {(4, None, ("q_proj", "down_proj"))}
    assert configs["corda++"].budget == 5000 and configs["corda"].budget is None
    assert configs["corda"].covariance_normalization == "none"
    assert configs["lora"].mode == "kpm" and cfg.corda_config("corda").mode == "kpm"
    _, ipm = parse_recipe("doc", config_file, ["--mode", "ipm"])
    assert ipm.corda_config("corda").mode == "ipm" and ipm.corda_config("lora").mode == "kpm"  # lora: no covariance
    assert cfg.train_config().steps == 10 and cfg.train_config().lr == 0.01


ROWS = [torch.randint(0, VOCAB, (10,), generator=torch.Generator().manual_seed(i)) for i in range(8)]


def loss_fn(model, rows):
    ids = torch.stack(rows)
    return model(input_ids=ids, labels=ids).loss


def fit(model):
    """Task: per training row, the negative loss (higher is better)."""
    with torch.no_grad():
        return ItemScores("neg_loss", [-loss_fn(model, [r]).item() for r in ROWS])


def text(model):
    """Retention: per text of another batch, its mean NLL per token, as a perplexity."""
    other = text_batches()[0]
    with torch.no_grad():
        logits = model(**other).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), other["input_ids"][:, 1:], reduction="none")
    mask = other["attention_mask"][:, 1:].float()
    return token_nll("perplexity", ((nll * mask).sum(1) / mask.sum(1)).tolist(), mask.sum(1).tolist())


def recipe(**overrides):
    settings = dict(recipe="demo", model="tiny", task="fit", task_train_rows=len(ROWS), task_eval_rows=len(ROWS),
                    retention=["text"], output_dir="unused", mode="kpm", rank=2, target_modules=["q_proj", "v_proj"],
                    seed=0, steps=4, batch_size=2, lr=0.05, warmup_steps=1, checkpoint_every=2, mixed_precision="no",
                    scale_sweep=True, scales=[0.0, 1.0])
    cfg = RecipeConfig(**{**settings, **overrides})
    return Recipe("demo", cfg, tiny_llama, ROWS, loss_fn, {"fit": fit, "text": text}, "fit",
                  calibration=lambda seed: text_batches())


def stores_for(r, tmp_path):
    return calibrate_seeds(r, tiny_llama(), tmp_path, resume=False)


@pytest.mark.parametrize("method", ["lora", "corda", "corda++"])
def test_run_method_trains_evaluates_saves_and_sweeps(method, tmp_path):
    r = recipe(methods=[method], calib_splits=2)
    before = r.evaluate(tiny_llama())
    setting = Setting(method, 0.05, 0.0, 0)
    runs = run_method(r, setting, stores_for(r, tmp_path), before, tmp_path, progress=False)
    run, at0, at1 = runs
    assert run.scale is None and (at0.scale, at1.scale) == (0.0, 1.0)
    assert run.task.after > run.task.before  # it learned
    assert at0.task.after == run.task.before  # scale 0: the original model, its scores reused
    assert at1.task.after == pytest.approx(run.task.after, abs=1e-5)
    assert (run.rank, run.budget) == ((None, run.budget) if method == "corda++" else (2, None))
    assert run.mode == (None if method == "lora" else "kpm")
    assert (run.seed, run.lr, run.weight_decay) == (0, 0.05, 0.0) and len(run.losses) == 4
    assert run.update["fro"] > 0 and 0 < run.update["relative"] < 1
    out = tmp_path / "runs" / setting.path
    assert {p.name for p in out.iterdir()} >= {"init", "adapter", "lora", "checkpoints", "train_log.jsonl", "runs.json",
                                               "items.jsonl", "items_scale1.jsonl"}
    items = read_items(out / "items.jsonl")
    assert items["fit"].value == pytest.approx(run.task.after) and len(items["text"].values) == 4
    # the trained adapter loads with stock PEFT on the saved residual and scores what the run reported
    stock = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(out / "init" / "residual"), out / "adapter")
    assert fit(stock).value == pytest.approx(run.task.after, abs=1e-5)
    # the exported plain LoRA does the same on the ORIGINAL base
    plain = PeftModel.from_pretrained(tiny_llama(), out / "lora")
    assert fit(plain).value == pytest.approx(run.task.after, abs=1e-4)
    again = run_method(r, setting, {}, before, tmp_path, resume=True, progress=False)
    assert again == runs  # a finished run is read back, not rerun
    paths = write_report(tmp_path, "demo", "tiny", runs)
    assert load_results(paths["results"])[2] == runs
    assert "scale" in results_table(runs) and run.arm in results_table(runs)


def test_a_repeated_seed_gives_identical_results_and_another_seed_does_not(tmp_path):
    r = recipe(scale_sweep=False, seeds=[0, 1], methods=["lora", "corda"])
    stores = stores_for(r, tmp_path)
    before = r.evaluate(tiny_llama())
    a = run_method(r, Setting("corda", 0.05, 0.0, 0), stores, before, tmp_path / "a", progress=False)
    b = run_method(r, Setting("corda", 0.05, 0.0, 0), stores, before, tmp_path / "b", progress=False)
    c = run_method(r, Setting("corda", 0.05, 0.0, 1), stores, before, tmp_path / "c", progress=False)
    assert a[0].task == b[0].task and a[0].retention == b[0].retention and a[0].losses == b[0].losses
    assert read_items(tmp_path / "a/runs/corda/lr0.05_wd0/seed0/items.jsonl") == \
        read_items(tmp_path / "b/runs/corda/lr0.05_wd0/seed0/items.jsonl")
    assert c[0].losses != a[0].losses  # the seed changes the training order


def test_the_grid_is_seeds_by_methods_by_rates(tmp_path):
    cfg = recipe(seeds=[3, 4], methods=["lora", "corda", "pissa"], lrs=[0.01, 0.02], lr_methods=["lora", "corda"],
                 lora_weight_decays=[0.1]).cfg
    grid = settings(cfg)
    assert len(grid) == 2 * (2 + 1 + 2 + 1)  # lora 2 rates + wd, corda 2 rates, pissa at lr
    assert grid[0] == Setting("lora", 0.01, 0.0, 3) and {s.seed for s in grid[:6]} == {3}
    assert Setting("lora", 0.05, 0.1, 4) in grid and Setting("pissa", 0.05, 0.0, 4) in grid
    assert len({s.path for s in grid}) == len(grid)
    assert settings(recipe().cfg) == [Setting(m, 0.05, 0.0, 0) for m in ("lora", "corda", "corda++")]


@pytest.mark.parametrize("method", ["peft-corda", "eva", "mica"])
def test_peft_baselines_run_through_the_methods_flag(method, config_file, tmp_path):
    _, parsed = parse_recipe("doc", config_file, ["--methods", f"lora,{method}"])
    assert parsed.methods == ["lora", method] and parsed.corda_config(method).method == "lora"  # lora's targets
    r = recipe(methods=["lora", method], scale_sweep=False, steps=2)
    before = r.evaluate(tiny_llama())
    (run,) = run_method(r, Setting(method, 0.05, 0.0, 0), {}, before, tmp_path, progress=False)
    (lora,) = run_method(r, Setting("lora", 0.05, 0.0, 0), {}, before, tmp_path, progress=False)
    assert run.method == method and run.mode == ("kpm" if method == "peft-corda" else None)
    # the same layers at the same rank as lora; mica trains A alone (B is frozen by design)
    assert (run.trainable_params < lora.trainable_params) if method == "mica" else \
        (run.trainable_params == lora.trainable_params)
    init = PeftModel.from_pretrained(tiny_llama(), tmp_path / "runs" / Setting(method, 0.05, 0.0, 0).path / "lora")
    assert fit(init).value == pytest.approx(run.task.after, abs=1e-4)  # exported for the original base
    assert run.update["fro"] > 0
