"""A process the fault-injection tests kill with SIGKILL at a random moment: it writes one stage's
files over and over (or trains once), printing "ready" when the writing starts."""

import sys
from pathlib import Path

import torch
from conftest import text_batches, tiny_llama

from corda_vl import CordaConfig, build_corda, collect_covariances, save_corda
from corda_vl.lab.training import TrainConfig, train

ROWS = [torch.randint(0, 96, (12,), generator=torch.Generator().manual_seed(i)) for i in range(10)]
TRAIN = dict(steps=40, batch_size=3, lr=1e-2, warmup_steps=2, checkpoint_every=1, keep_checkpoints=2,
             mixed_precision="no")


def loss_fn(model, rows):
    ids = torch.stack(rows)
    return model(input_ids=ids, labels=ids).loss


def fresh_lora():
    torch.manual_seed(0)
    return build_corda(tiny_llama(), None, CordaConfig(method="lora", r=2, target_modules=["q_proj", "down_proj"]),
                       progress=False)


def versions(stage):
    """Two complete versions the writes alternate between."""
    if stage == "store":
        return [collect_covariances(tiny_llama(), text_batches(2, seed=s), progress=False) for s in (1, 2)]
    return [build_corda(tiny_llama(), None, CordaConfig(method="pissa", r=r), progress=False) for r in (2, 4)]


def main(stage: str, out: Path) -> None:
    if stage == "train":
        model = fresh_lora()
        print("ready", flush=True)
        train(model, ROWS, loss_fn, TrainConfig(**TRAIN), out, resume=True, progress=False)
        return
    objs = versions(stage)
    print("ready", flush=True)
    i = 0
    while True:
        obj = objs[i % 2]
        if stage == "store":
            obj.save(out / "cov.safetensors")
        else:
            save_corda(obj, out / "saved", overwrite=True)
        i += 1


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
