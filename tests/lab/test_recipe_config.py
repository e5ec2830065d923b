"""The recipes' typed configs: the three YAMLs load into their classes, the smoke section and
overrides merge, bad keys / methods / modes / types are refused with the remedy, every field has
help text and a flag, and a config round-trips through to_dict."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from corda_vl import CordaError
from corda_vl.lab.experiment import parse_recipe
from corda_vl.lab.recipe_config import (NO_FLAG, ClipRecipeConfig, LlamaRecipeConfig, LlavaRecipeConfig, RecipeConfig,
                                        add_flags, flag_values)
from corda_vl.lab.training import TrainConfig

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "configs"
CLASSES = {"llama_kpm": LlamaRecipeConfig, "clip_kpm": ClipRecipeConfig, "llava_kpm": LlavaRecipeConfig}


def yaml_path(name: str) -> Path:
    return CONFIGS / f"{name}.yaml"


def write_variant(tmp_path: Path, name: str, **changes) -> Path:
    """A copy of recipe ``name``'s YAML with ``changes`` applied (None removes a key)."""
    values = yaml.safe_load(yaml_path(name).read_text())
    for key, value in changes.items():
        if value is None:
            values.pop(key)
        else:
            values[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_each_yaml_loads_into_its_class():
    llama = LlamaRecipeConfig.from_yaml(yaml_path("llama_kpm"))
    assert (llama.recipe, llama.model, llama.rank, llama.task) == ("llama_kpm", "smollm2-135m-instruct", 16, "reverse")
    assert llama.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert llama.corda == {"damping": [0.01, 0.1, 1.0]} and llama.retention == ["capitals", "knowledge", "facts", "general"]
    assert (llama.capital_questions, llama.fact_texts, llama.capital_shots, llama.threads) == (125, 125, 3, None)
    assert llama.knowledge_fields == ["region", "languages"] and llama.general_texts == 200
    clip = ClipRecipeConfig.from_yaml(yaml_path("clip_kpm"))
    assert (clip.rank, clip.steps, clip.batch_size, clip.threads, clip.logit_scale) == (8, 300, 32, 1, None)
    assert clip.retention == ["digits", "shapes", "colors"] and clip.train_template == "a photo of a {}."
    llava = LlavaRecipeConfig.from_yaml(yaml_path("llava_kpm"))
    assert llava.groups == ["vision", "projector", "language"] and llava.cordapp == {"candidates": ["calib"]}
    assert (llava.lr, llava.calib_splits, llava.vqa_new_tokens) == (0.0005, 1, 4)
    assert llava.template == "<image>\nQuestion: {question}\nAnswer:"


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_the_config_gives_the_train_and_corda_configs(name):
    cfg = CLASSES[name].from_yaml(yaml_path(name))
    train = cfg.train_config()
    assert (train.steps, train.batch_size, train.lr, train.seed) == (cfg.steps, cfg.batch_size, cfg.lr, cfg.seed)
    cordapp = cfg.corda_config("corda++")
    assert (cordapp.method, cordapp.r, cordapp.mode, cordapp.budget) == ("corda++", cfg.rank, "kpm", None)
    assert cordapp.target_modules == cfg.target_modules and cordapp.groups == cfg.groups
    assert cfg.corda_config("lora").budget is None  # the budget is corda++'s alone
    assert cordapp.compactness == "bound"


def test_a_corda_plus_plus_variant_picks_its_compactness_metric():
    cfg = LlamaRecipeConfig.from_yaml(yaml_path("llama_kpm"), overrides={"methods": ["corda++", "corda++:heldout"],
                                                                         "lr_methods": ["corda++:heldout"]})
    variant = cfg.corda_config("corda++:heldout")
    assert (variant.method, variant.compactness, variant.budget) == ("corda++", "heldout", cfg.budget)
    assert variant.damping == cfg.corda_config("corda++").damping  # everything else as corda++
    from corda_vl.lab.experiment import Setting
    assert Setting("corda++:heldout", 0.001, 0.0, 0).path == "cordapp-heldout/lr0.001_wd0/seed0"
    with pytest.raises(CordaError, match=r"method 'corda\+\+:best': a variant is corda\+\+:<bound\|paper\|heldout> or"):
        LlamaRecipeConfig.from_yaml(yaml_path("llama_kpm"), overrides={"methods": ["corda++:best"]})


def test_a_corda_variant_sets_one_field_and_is_checked_before_any_model_loads():
    cfg = ClipRecipeConfig.from_yaml(yaml_path("clip_kpm"), overrides={
        "methods": ["corda", "corda:damping=0.01", "corda:factor_balance=norm", "corda++:damping=0.001"]})
    assert cfg.corda_config("corda").damping == (1e-2, 1e-1, 1.0)  # the engine default
    assert cfg.corda_config("corda:damping=0.0001").damping == (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    assert cfg.corda_config("corda:damping=0.01").damping == (0.01, 0.1, 1.0)  # the schedule from 1e-2 up
    assert cfg.corda_config("corda:damping=0.003").damping == (0.003, 0.01, 0.1, 1.0)
    balanced = cfg.corda_config("corda:factor_balance=norm")
    assert (balanced.method, balanced.factor_balance, balanced.damping) == ("corda", "norm", cfg.corda_config("corda").damping)
    assert cfg.corda_config("corda++:damping=0.001").budget == cfg.corda_config("corda++").budget
    # the variant wins over the YAML's corda: section (llama_kpm sets damping >= 1e-2 there)
    llama = LlamaRecipeConfig.from_yaml(yaml_path("llama_kpm"), overrides={"methods": ["corda", "corda:damping=0.0001"]})
    assert llama.corda_config("corda").damping[0] == 0.01 and llama.corda_config("corda:damping=0.0001").damping[0] == 1e-4
    from corda_vl.lab.experiment import Setting
    assert Setting("corda:damping=0.01", 0.001, 0.0, 0).path == "corda-damping=0.01/lr0.001_wd0/seed0"
    for bad, message in [("corda:factor_balance=both", "factor_balance='both' must be 'sigma' or 'norm'"),
                         ("corda:damping=lots", "damping must be a number"),
                         ("corda:rank=4", "field one of damping, factor_balance"),
                         ("lora:damping=0.01", "a variant is"), ("corda:damping", "a variant is")]:
        with pytest.raises(CordaError, match=message):
            ClipRecipeConfig.from_yaml(yaml_path("clip_kpm"), overrides={"methods": ["corda", bad]})


def test_every_train_config_field_is_a_recipe_field_with_the_same_default():
    recipe_fields = {f.name: f for f in fields(RecipeConfig)}
    for f in fields(TrainConfig):
        assert f.name in recipe_fields, f.name
        assert recipe_fields[f.name].default == f.default, f.name


def test_smoke_section_then_overrides_are_merged_on_top():
    cfg = LlamaRecipeConfig.from_yaml(yaml_path("llama_kpm"), smoke=True)
    assert (cfg.rank, cfg.steps, cfg.output_dir) == (2, 4, "out/llama_kpm_smoke")
    assert cfg.target_modules == r"model\.layers\.0\.(self_attn\.(q|v)_proj|mlp\.down_proj)"  # a regex string
    assert (cfg.lr, cfg.fact_texts) == (0.001, 4)  # lr is not in the smoke section: the YAML's
    cfg = LlamaRecipeConfig.from_yaml(yaml_path("llama_kpm"), smoke=True,
                                      overrides={"rank": 3, "corda": {"covariance_normalization": "none"}})
    assert cfg.rank == 3 and cfg.steps == 4
    assert cfg.corda == {"damping": [0.01, 0.1, 1.0], "covariance_normalization": "none"}  # merged, not replaced
    assert LlamaRecipeConfig.from_yaml(yaml_path("llama_kpm")).rank == 16  # without smoke: the section is ignored


def test_an_unknown_key_is_refused_with_a_guess_and_the_known_keys(tmp_path):
    path = write_variant(tmp_path, "llama_kpm", rnak=4)
    with pytest.raises(CordaError, match=r"unknown key\(s\) \['rnak'\] \(rnak: did you mean rank\?\); fix the "
                                         r"spelling or remove them\. LlamaRecipeConfig knows: recipe, model"):
        LlamaRecipeConfig.from_yaml(path)
    with pytest.raises(CordaError, match="fact_texts"):  # another recipe's key
        ClipRecipeConfig.from_yaml(yaml_path("llama_kpm"))
    with pytest.raises(CordaError, match=r"unknown key.*'stpes'"):
        LlamaRecipeConfig.from_yaml(yaml_path("llama_kpm"), overrides={"stpes": 3})
    path = write_variant(tmp_path, "clip_kpm", smoke={"rank": 2, "batchsize": 4})
    with pytest.raises(CordaError, match=r"\(smoke:\): unknown key.*'batchsize'.*did you mean batch_size"):
        ClipRecipeConfig.from_yaml(path)  # checked even without --smoke


def test_unknown_methods_and_bad_modes_are_refused_with_the_remedy(tmp_path):
    with pytest.raises(CordaError, match=r"unknown method\(s\) \['dora'\]: choose one or more of lora, .*corda\+\+, "
                                         r"peft-corda, eva, mica \(e\.g\. --methods lora,corda,corda\+\+; "
                                         r"corda\+\+:<metric> or corda:<field>=<value> for a variant\), or register"):
        LlamaRecipeConfig.from_yaml(yaml_path("llama_kpm"), overrides={"methods": ["lora", "dora"]})
    path = write_variant(tmp_path, "llama_kpm", mode="both")
    with pytest.raises(CordaError, match=r"llama_kpm\.yaml: mode must be 'kpm' or 'ipm', got 'both'; fix it in the "
                                         r"YAML or with --mode\."):
        LlamaRecipeConfig.from_yaml(path)
    with pytest.raises(CordaError, match=r"unknown retention benchmark\(s\) \['capitols'\] for llama_kpm: choose "
                                         r"from capitals, knowledge, facts, general"):
        LlamaRecipeConfig.from_yaml(yaml_path("llama_kpm"), overrides={"retention": ["capitols"]})
    with pytest.raises(CordaError, match=r"\['easyvqa'\] for llava_kpm: choose from easy_vqa, capitals, general"):
        LlavaRecipeConfig.from_yaml(yaml_path("llava_kpm"), overrides={"retention": ["easyvqa"]})
    with pytest.raises(CordaError, match="methods is empty"):
        LlamaRecipeConfig.from_yaml(yaml_path("llama_kpm"), overrides={"methods": []})


@pytest.mark.parametrize("key,value,message", [
    ("rank", "sixteen", "rank must be int, got 'sixteen'"),
    ("rank", True, "rank must be int, got True"),  # a bool is not a count
    ("retention", "capitals", r"retention must be list\[str\], got 'capitals'"),
    ("scales", [0, "half"], r"scales must be list\[float\]"),
    ("calib_sample_scale", "mean", "calib_sample_scale must be 'none' or 'max'"),
    ("corda", {"dampin": [0.1]}, r"corda: \['dampin'\] are not CordaConfig fields"),
    ("output_dir", None, r"missing key\(s\) \['output_dir'\]; add them to the YAML"),
    ("steps", 0, r"steps=0 must be at least 1 \(--steps\)"),
    ("lr", -1.0, r"lr=-1.0 must be a finite number above 0"),
    ("lr", float("nan"), r"lr=nan must be a finite number above 0"),
    ("scales", [0.5, 1.5], r"scales=\[0.5, 1.5\] must be between 0 \(the base model\) and 1"),
    ("seeds", [0, -1], r"seeds=\[0, -1\] must be 0 or more"),
    ("weight_decay", -0.1, r"weight_decay=-0.1 must be 0 or more"),
])
def test_wrong_types_and_missing_keys_are_refused(tmp_path, key, value, message):
    with pytest.raises(CordaError, match=message):
        LlamaRecipeConfig.from_yaml(write_variant(tmp_path, "llama_kpm", **{key: value}))


def test_ints_are_floats_and_none_fills_optional_keys(tmp_path):
    cfg = LlamaRecipeConfig.from_yaml(write_variant(tmp_path, "llama_kpm", lr=1, scales=[0, 1]))
    assert cfg.lr == 1 and cfg.scales == [0, 1]
    cfg = LlamaRecipeConfig.from_yaml(yaml_path("llama_kpm"), overrides={"grad_clip_norm": None})
    assert cfg.grad_clip_norm is None and cfg.train_config().grad_clip_norm is None


@pytest.mark.parametrize("config_type", [RecipeConfig, *CLASSES.values()])
def test_every_field_has_help_text_and_a_flag(config_type):
    parser = argparse.ArgumentParser()
    add_flags(parser, config_type)
    flags = {option for action in parser._actions for option in action.option_strings}
    for f in fields(config_type):
        text = f.metadata.get("help", "")
        assert isinstance(text, str) and len(text) > 10 and text.rstrip().endswith((".", ")")), f.name
        if f.name not in NO_FLAG:
            assert "--" + f.name.replace("_", "-") in flags, f.name
    assert "--recipe" not in flags


def test_flags_parse_into_the_config(tmp_path):
    argv = ["--rank", "8", "--methods", "lora,corda", "--output-dir", str(tmp_path), "--calib-samples", "64",
            "--capital-shots", "5", "--scale-sweep"]
    _, cfg = parse_recipe("doc", yaml_path("llama_kpm"), argv, config_type=LlamaRecipeConfig)
    assert isinstance(cfg, LlamaRecipeConfig)
    assert (cfg.rank, cfg.methods, cfg.output_dir) == (8, ["lora", "corda"], str(tmp_path))
    assert (cfg.calib_samples, cfg.capital_shots, cfg.scale_sweep, cfg.steps) == (64, 5, True, 100)
    args, cfg = parse_recipe("doc", yaml_path("llama_kpm"), ["--smoke", "--method", "pissa", "--dry-run"],
                             config_type=LlamaRecipeConfig)
    assert cfg.methods == ["pissa"] and cfg.rank == 2 and args.dry_run and not args.resume


def test_list_mapping_none_and_bool_flags():
    parser = argparse.ArgumentParser()
    add_flags(parser, ClipRecipeConfig)
    args = parser.parse_args(["--threads", "none", "--scales", "0,0.5", "--target-modules", "q_proj, v_proj",
                              "--corda", "{damping: [0.1]}", "--no-scale-sweep", "--lr", "2e-3",
                              "--logit-scale", "50"])
    overrides = flag_values(args, ClipRecipeConfig)
    assert overrides == {"threads": None, "scales": [0.0, 0.5], "target_modules": ["q_proj", "v_proj"],
                         "corda": {"damping": [0.1]}, "scale_sweep": False, "lr": 0.002, "logit_scale": 50.0}
    cfg = ClipRecipeConfig.from_yaml(yaml_path("clip_kpm"), overrides=overrides)
    assert (cfg.threads, cfg.scales, cfg.lr, cfg.logit_scale) == (None, [0.0, 0.5], 0.002, 50.0)  # the YAML has 1
    assert flag_values(parser.parse_args([]), ClipRecipeConfig) == {}  # nothing given: the YAML's values stay
    with pytest.raises(SystemExit):
        parser.parse_args(["--rank", "eight"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--corda", "[1, 2]"])


def test_help_lists_every_setting_with_its_text(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_recipe("the llava recipe", yaml_path("llava_kpm"), ["--help"], config_type=LlavaRecipeConfig)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "the llava recipe" in out and "--dry-run" in out and "--method " in out
    assert "--vqa-new-tokens INT" in out and "Most tokens generated per VQA answer." in out
    assert "--mode {kpm,ipm}" in out and "--calib-samples INT" in out


@pytest.mark.parametrize("name", sorted(CLASSES))
@pytest.mark.parametrize("smoke", [False, True])
def test_a_config_round_trips_through_to_dict_and_yaml(tmp_path, name, smoke):
    cfg = CLASSES[name].from_yaml(yaml_path(name), smoke=smoke)
    data = cfg.to_dict()
    assert list(data) == [f.name for f in fields(cfg)] and json.loads(json.dumps(data)) == data
    raw = yaml.safe_load(yaml_path(name).read_text())
    smoke_part = raw.pop("smoke")
    assert {k: data[k] for k in raw} == {**raw, **(smoke_part if smoke else {})}  # the YAML's values, as written
    path = tmp_path / "again.yaml"
    path.write_text(yaml.safe_dump(data))
    assert CLASSES[name].from_yaml(path) == cfg
    assert CLASSES[name].from_dict(data) == cfg
