"""Turning text into calibration batches."""

from __future__ import annotations

import torch


def token_blocks(tokenizer, texts: list[str], n_blocks: int, block_len: int, batch_size: int = 8) -> list[dict]:
    """``n_blocks`` sequences of exactly ``block_len`` tokens cut from the concatenated texts
    (cycled if too short), grouped into batches. No padding, so every token counts."""
    ids: list[int] = []
    sep = tokenizer.eos_token_id
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if sep is not None:
            ids.append(sep)
    need = n_blocks * block_len
    if not ids:
        raise ValueError("token_blocks needs non-empty texts.")
    while len(ids) < need:
        ids = ids + ids
    blocks = torch.tensor(ids[:need]).view(n_blocks, block_len)
    return [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in blocks.split(batch_size)]


def padded_batches(tokenizer, texts: list[str], batch_size: int = 8, max_length: int | None = None) -> list[dict]:
    """Tokenised, right-padded batches with attention masks (padding is excluded by calibration)."""
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True,
                        truncation=max_length is not None, max_length=max_length)
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return batches
