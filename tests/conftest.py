"""Tiny models built from configs (no downloads) and helpers shared by the tests."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 96


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie, pad_token_id=0)
    return LlamaForCausalLM(config).to(dtype).eval()


def text_batches(n_batches: int = 3, batch_size: int = 4, length: int = 20, seed: int = 1, pad: bool = True):
    """Random token batches; with ``pad`` some rows end in right padding (mask 0)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(1, VOCAB, (batch_size, length), generator=g)
        mask = torch.ones_like(ids)
        if pad:
            for row in range(1, batch_size, 2):
                cut = int(torch.randint(length // 3, length, (1,), generator=g))
                ids[row, cut:] = 0
                mask[row, cut:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def batches():
    return text_batches()
