"""Recipe plumbing: YAML + smoke section + flags into the typed config, the CordaConfig of each
method, and one method's run from build to report rows (on a tiny LLaMA, seconds)."""

import json

import pytest
import torch
from conftest import VOCAB, text_batches, tiny_llama
from peft import PeftModel
from transformers import LlamaForCausalLM

from corda_vl import CordaError, collect_covariances, load_results, write_report
from corda_vl.lab.experiment import Recipe, parse_recipe, results_table, run_method
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


def evaluate(model):
    """A task score (negative loss on the training rows) and a retention score (perplexity of other text)."""
    with torch.no_grad():
        task = -loss_fn(model, ROWS).item()
        other = text_batches()[0]
        ppl = torch.exp(model(**other, labels=other["input_ids"]).loss).item()
    return {"fit": ("neg_loss", task), "text": ("perplexity", ppl)}


def recipe(**overrides):
    settings = dict(recipe="demo", model="tiny", task="fit", task_train_rows=len(ROWS), task_eval_rows=len(ROWS),
                    retention=["text"], output_dir="unused", mode="kpm", rank=2, target_modules=["q_proj", "v_proj"],
                    seed=0, steps=4, batch_size=2, lr=0.05, warmup_steps=1, checkpoint_every=2, mixed_precision="no",
                    scale_sweep=True, scales=[0.0, 1.0])
    cfg = RecipeConfig(**{**settings, **overrides})
    return Recipe("demo", cfg, tiny_llama, ROWS, loss_fn, evaluate, "fit")


@pytest.mark.parametrize("method", ["lora", "corda", "corda++"])
def test_run_method_trains_evaluates_saves_and_sweeps(method, tmp_path):
    store = collect_covariances(tiny_llama(), text_batches(), splits=2, progress=False)
    before = evaluate(tiny_llama())
    runs = run_method(recipe(), method, store, before, tmp_path, progress=False)
    run, at0, at1 = runs
    assert run.scale is None and (at0.scale, at1.scale) == (0.0, 1.0)
    assert run.task.after > run.task.before  # it learned
    assert at0.task.after == pytest.approx(run.task.before, abs=1e-4)  # scale 0: the original model
    assert at1.task.after == pytest.approx(run.task.after, abs=1e-5)
    assert (run.rank, run.budget) == ((None, run.budget) if method == "corda++" else (2, None))
    assert run.mode == (None if method == "lora" else "kpm")
    out = tmp_path / method.replace("+", "p")
    assert {p.name for p in out.iterdir()} >= {"init", "adapter", "lora", "checkpoints", "train_log.jsonl", "runs.json"}
    # the trained adapter loads with stock PEFT on the saved residual and scores what the run reported
    stock = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(out / "init" / "residual"), out / "adapter")
    assert evaluate(stock)["fit"][1] == pytest.approx(run.task.after, abs=1e-5)
    # the exported plain LoRA does the same on the ORIGINAL base
    plain = PeftModel.from_pretrained(tiny_llama(), out / "lora")
    assert evaluate(plain)["fit"][1] == pytest.approx(run.task.after, abs=1e-4)
    again = run_method(recipe(), method, store, before, tmp_path, resume=True, progress=False)
    assert again == runs  # a finished method is read back, not rerun
    paths = write_report(tmp_path, "demo", "tiny", runs)
    assert load_results(paths["results"])[2] == runs
    assert "scale" in results_table(runs) and run.label in results_table(runs)


def test_same_settings_give_the_same_numbers(tmp_path):
    store = collect_covariances(tiny_llama(), text_batches(), progress=False)
    before = evaluate(tiny_llama())
    a = run_method(recipe(scale_sweep=False), "corda", store, before, tmp_path / "a", progress=False)
    b = run_method(recipe(scale_sweep=False), "corda", store, before, tmp_path / "b", progress=False)
    assert a[0].task == b[0].task and a[0].retention == b[0].retention
    log_a = [json.loads(x)["loss"] for x in (tmp_path / "a" / "corda" / "train_log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x)["loss"] for x in (tmp_path / "b" / "corda" / "train_log.jsonl").read_text().splitlines()]
    assert log_a == log_b
