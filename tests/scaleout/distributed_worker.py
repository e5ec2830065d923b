"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node N`` (gloo, CPU).

Each rank writes what it computed to ``OUT/rank{r}/`` as safetensors / text so the test (one
process, outside torchrun) can compare ranks with each other and with a single-process run:

* ``store.safetensors``: collect_covariances over the shared tiny-LLaMA batches (sharded, reduced)
* ``clip_store.safetensors``: tiny CLIP, batches alternating image / text, so with two ranks one
  rank sees only images and the other only text (the reduce must take the union of keys)
* ``<method>.safetensors``: adapter factors and residual weights built from REFERENCE_STORE (a
  store file the test wrote), so the decompositions of every run start from identical input
* ``sequential.safetensors``: build_corda_sequential on the same batches (sharded, per-block reduce)
* ``trained.safetensors``: a LoRA trained 3 steps (each rank seeded differently before building it)
* ``fingerprint_error.txt``: rank 1 calibrated a model with other weights
* ``nested.txt`` (rank 1): whether rank 0 had finished the outer of two nested main-first blocks
* ``calibration_error.txt`` / ``decomposition_error.txt``: what a rank raised when another rank
  failed (rank 1 gets a NaN batch / a failing decomposition)
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest

import torch
import torch.distributed as dist
from conftest import clip_batches, text_batches, tiny_clip, tiny_llama
from safetensors.torch import save_file

from corda_vl.methods import corda as corda_method
from corda_vl.scaleout.distributed import main_process_first
from corda_vl.lab.training import TrainConfig, train
from corda_vl import CordaConfig, CovarianceStore, build_corda, build_corda_sequential, collect_covariances

METHODS = {
    "corda_kpm": CordaConfig(method="corda", mode="kpm", r=4),
    "corda_ipm": CordaConfig(method="corda", mode="ipm", r=4),
    "cordapp": CordaConfig(method="corda++", mode="kpm", r=4, budget=3000),
    "milora": CordaConfig(method="milora", r=4),
}


def adapter_tensors(peft_model) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in peft_model.named_parameters() if "lora_" in n or "base_layer" in n}


def main(out: Path, reference: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    here = out / f"rank{rank}"
    here.mkdir(parents=True, exist_ok=True)

    store = collect_covariances(tiny_llama(), text_batches(5), splits=2, progress=False)
    store.save(here / "store.safetensors")
    collect_covariances(tiny_clip(), clip_batches(2), progress=False).save(here / "clip_store.safetensors")

    for name, config in METHODS.items():
        model = tiny_llama()
        ref = CovarianceStore.load(reference, model)
        save_file(adapter_tensors(build_corda(model, ref, config, progress=False)), str(here / f"{name}.safetensors"))

    # IPM: its largest components are well separated; the smallest (KPM) of o_proj are degenerate
    # here (its input has rank 16 < 32), so any rounding rotates them and a tolerance means nothing
    sequential = build_corda_sequential(tiny_llama(), text_batches(5), CordaConfig(r=4, mode="ipm"), progress=False)
    save_file(adapter_tensors(sequential), str(here / "sequential.safetensors"))
    # corda++ block by block: per-block analysis gathered on every rank, one allocation at the end
    cordapp = CordaConfig(method="corda++", r=4, mode="ipm")
    sequential = build_corda_sequential(tiny_llama(), text_batches(5), cordapp, progress=False)
    save_file(adapter_tensors(sequential), str(here / "sequential_cordapp.safetensors"))

    batches = text_batches(4)
    if rank == 1:
        batches[1]["input_ids"][0, 0] = 10**6  # out of the embedding's range: this rank fails
    try:
        collect_covariances(tiny_llama(), batches, progress=False)
    except Exception as exc:  # noqa: BLE001 - the test reads the message
        (here / "calibration_error.txt").write_text(f"{type(exc).__name__}: {exc}")

    torch.manual_seed(rank)  # a different random LoRA A on each rank: training must start from rank 0's
    lora = build_corda(tiny_llama(), None, CordaConfig(method="lora", r=4), progress=False)
    ids = text_batches(1, batch_size=8, pad=False)[0]["input_ids"]

    def loss_fn(m, rows):  # a mean over rows: the 2-process step equals the 1-process step
        return m(input_ids=ids[rows]).logits.float().pow(2).mean()

    config = TrainConfig(steps=3, batch_size=4, grad_accum=2, lr=1e-2, warmup_steps=1, seed=0, checkpoint_every=0)
    train(lora, list(range(8)), loss_fn, config, here / "train", progress=False)
    save_file(adapter_tensors(lora), str(here / "trained.safetensors"))

    model = tiny_llama()
    if rank == 1:  # another checkpoint on this rank
        model.model.layers[0].mlp.down_proj.weight.data *= 1.5
    try:
        collect_covariances(model, text_batches(2), progress=False)
    except Exception as exc:  # noqa: BLE001
        (here / "fingerprint_error.txt").write_text(f"{type(exc).__name__}: {exc}")

    with main_process_first():  # nested, as the default LLaVA's build builds the default CLIP
        with main_process_first():
            pass
        if rank == 0:
            time.sleep(0.3)
            (out / "outer_done").write_text("built")
        else:
            (here / "nested.txt").write_text(str((out / "outer_done").exists()))

    if rank == 1:  # every decomposition on this rank fails
        def broken(*args, **kwargs):
            raise torch.linalg.LinAlgError("simulated failure")
        corda_method.corda_factors = broken
    try:
        build_corda(tiny_llama(), CovarianceStore.load(reference), CordaConfig(r=4), progress=False)
    except Exception as exc:  # noqa: BLE001
        (here / "decomposition_error.txt").write_text(f"{type(exc).__name__}: {exc}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(os.environ["OUT"]), Path(os.environ["REFERENCE_STORE"]))
