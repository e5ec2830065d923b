"""The shared training loop: deterministic data order and schedule, checkpoints in safetensors +
JSON, and a resumed run that ends exactly where an uninterrupted one does."""

import json

import pytest
import torch
from conftest import VOCAB, tiny_llama

from corda_vl import CordaConfig, CordaError, build_corda
from corda_vl.lab.training import (TrainConfig, batch_indices, latest_checkpoint, learning_rate, train,
                               trainable_parameters)

ROWS = [torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(i)) for i in range(10)]


def loss_fn(model, rows):
    ids = torch.stack(rows)
    return model(input_ids=ids, labels=ids).loss


def fresh(seed=0):
    torch.manual_seed(seed)
    return build_corda(tiny_llama(), None, CordaConfig(method="lora", r=2, target_modules=["q_proj", "down_proj"]),
                       progress=False)


def adapter(model):
    return {n: p.detach().clone() for n, p in trainable_parameters(model).items()}


CONFIG = dict(steps=6, batch_size=3, lr=1e-2, warmup_steps=2, checkpoint_every=2, mixed_precision="no")


def test_batch_indices_cover_every_row_once_per_epoch_and_depend_only_on_seed_and_step():
    config = TrainConfig(batch_size=3, grad_accum=2, steps=10, seed=5)
    seen = [i for step in range(5) for micro in range(2) for i in batch_indices(step, micro, 10, config)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert seen[:10] != seen[10:20]  # a new permutation each epoch
    assert batch_indices(3, 1, 10, config) == batch_indices(3, 1, 10, TrainConfig(batch_size=3, grad_accum=2, seed=5))
    assert batch_indices(0, 0, 10, config) != batch_indices(0, 0, 10, TrainConfig(batch_size=3, grad_accum=2, seed=6))


def test_learning_rate_warms_up_linearly_then_decays_to_zero():
    config = TrainConfig(steps=10, lr=1.0, warmup_steps=2)
    lrs = [learning_rate(s, config) for s in range(10)]
    assert lrs[:3] == [0.5, 1.0, 1.0]
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and 0 < lrs[-1] < 0.05


def test_train_lowers_the_loss_and_writes_a_log_line_per_step(tmp_path):
    model = fresh()
    result = train(model, ROWS, loss_fn, TrainConfig(**{**CONFIG, "steps": 12}), tmp_path, progress=False)
    assert result.losses[-1] < result.losses[0]
    lines = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(12)) and lines[0]["loss"] == pytest.approx(result.losses[0])
    assert not model.training


def test_only_trainable_parameters_change(tmp_path):
    model = fresh()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train(model, ROWS, loss_fn, TrainConfig(**CONFIG), tmp_path, progress=False)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


class Interrupt(Exception):
    pass


def test_resume_after_an_interruption_ends_exactly_like_an_uninterrupted_run(tmp_path):
    reference = fresh()
    full = train(reference, ROWS, loss_fn, TrainConfig(**CONFIG), tmp_path / "full", progress=False)

    calls = []

    def dies_at_step_5(model, rows):
        calls.append(1)
        if len(calls) == 5:  # step 4: after the checkpoint of step 4, before step 4 completes
            raise Interrupt
        return loss_fn(model, rows)

    with pytest.raises(Interrupt):
        train(fresh(), ROWS, dies_at_step_5, TrainConfig(**CONFIG), tmp_path / "cut", progress=False)
    assert latest_checkpoint(tmp_path / "cut").name == "step-000004"
    model = fresh(seed=1)  # another init: the checkpoint must overwrite it
    resumed = train(model, ROWS, loss_fn, TrainConfig(**CONFIG), tmp_path / "cut", resume=True, progress=False)
    assert resumed.resumed_from == 4 and resumed.losses == full.losses
    for name, value in adapter(reference).items():
        assert torch.equal(adapter(model)[name], value), name
    log = [json.loads(x)["step"] for x in (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()]
    assert log == list(range(6))


def test_checkpoints_are_safetensors_and_json_and_only_the_latest_are_kept(tmp_path):
    train(fresh(), ROWS, loss_fn, TrainConfig(**CONFIG), tmp_path, progress=False)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step-000004", "step-000006"]
    files = sorted(p.name for p in (tmp_path / "checkpoints" / "step-000006").iterdir())
    assert files == ["state.json", "train_log.jsonl", "trainable.safetensors"]


@pytest.mark.parametrize("damage", ["empty", "cut line", "missing"])
def test_a_damaged_top_level_log_does_not_lose_steps_on_resume(tmp_path, damage):
    """A kill used to leave train_log.jsonl empty or cut mid-line; the resumed history comes from
    the checkpoint's own copy of the log, so it is complete and equal to an uninterrupted run's."""
    full = train(fresh(), ROWS, loss_fn, TrainConfig(**CONFIG), tmp_path / "full", progress=False)
    calls = []

    def dies_at_step_5(model, rows):
        calls.append(1)
        if len(calls) == 5:
            raise Interrupt
        return loss_fn(model, rows)

    out = tmp_path / "cut"
    with pytest.raises(Interrupt):
        train(fresh(), ROWS, dies_at_step_5, TrainConfig(**CONFIG), out, progress=False)
    log = out / "train_log.jsonl"
    if damage == "empty":
        log.write_text("")
    elif damage == "cut line":
        log.write_text(log.read_text()[:-20])
    else:
        log.unlink()
    resumed = train(fresh(), ROWS, loss_fn, TrainConfig(**CONFIG), out, resume=True, progress=False)
    assert resumed.losses == full.losses
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == list(range(6))
    assert not list(out.glob("*.tmp"))


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    train(fresh(), ROWS, loss_fn, TrainConfig(**CONFIG), tmp_path, fingerprint={"method": "lora"}, progress=False)
    with pytest.raises(CordaError, match="another run"):
        train(fresh(), ROWS, loss_fn, TrainConfig(**CONFIG), tmp_path, resume=True, fingerprint={"method": "corda"},
              progress=False)
    with pytest.raises(CordaError, match="another run"):
        train(fresh(), ROWS, loss_fn, TrainConfig(**{**CONFIG, "lr": 0.5}), tmp_path, resume=True,
              fingerprint={"method": "lora"}, progress=False)


def test_bad_settings_and_inputs_are_refused(tmp_path):
    with pytest.raises(CordaError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(CordaError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp8")
    with pytest.raises(CordaError, match="no training rows"):
        train(fresh(), [], loss_fn, TrainConfig(**CONFIG), tmp_path, progress=False)
    with pytest.raises(CordaError, match="no trainable"):
        train(tiny_llama().requires_grad_(False), ROWS, loss_fn, TrainConfig(**CONFIG), tmp_path, progress=False)
    with pytest.raises(CordaError, match="loss is nan"):
        train(fresh(), ROWS, lambda m, r: loss_fn(m, r) * float("nan"), TrainConfig(**CONFIG), tmp_path, progress=False)
