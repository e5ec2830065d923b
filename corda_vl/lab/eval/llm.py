"""Language-model evaluators: knowledge QA by exact match (greedy generation) and by
log-likelihood, and perplexity on held-out text. They take any causal LM, PEFT-wrapped or not
(adapters stay attached, nothing is merged), batch internally and are deterministic."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import StoppingCriteriaList

from corda_vl.families.base import batch_to_device
from corda_vl.lab.eval.metrics import exact_match, perplexity

QA_TEMPLATE = "Question: {question}\nAnswer:"


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def qa_prompt(question: str, template: str = QA_TEMPLATE, shots: Sequence[tuple[str, str]] = ()) -> str:
    """Few-shot prompt: each shot is the template followed by its answer on one line."""
    prefix = "".join(f"{template.format(question=q)} {a}\n" for q, a in shots)
    return prefix + template.format(question=question)


@contextlib.contextmanager
def padding_side(tokenizer, side: str):
    """Batched generation needs prompts that end together (left padding); scoring needs tokens at
    their unpadded positions (right padding). The tokenizer's own setting is restored after."""
    before = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = before


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


_LINE_BREAK_IDS: dict[int, tuple[Any, torch.Tensor]] = {}


def line_break_ids(tokenizer) -> torch.Tensor:
    """Ids of the tokens whose text holds a line break (cached per tokenizer object)."""
    key = id(tokenizer)
    if key not in _LINE_BREAK_IDS or _LINE_BREAK_IDS[key][0] is not tokenizer:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        _LINE_BREAK_IDS[key] = (tokenizer, torch.tensor([i for i, t in enumerate(texts) if "\n" in t], dtype=torch.long))
    return _LINE_BREAK_IDS[key][1]


class StopAtLineBreak:
    """Per row, done once the answer is settled: its text, leading whitespace aside, holds a line
    break. An answer is cut at its first line break anyway, so what a few-shot prompt's model
    writes after it (the next "Question: ...") is never read; stopping there saves most of the
    generation time and leaves every answer as it was."""

    def __init__(self, tokenizer, prompt_length: int):
        self.tokenizer, self.prompt_length = tokenizer, prompt_length
        self.ids = line_break_ids(tokenizer)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        new = input_ids[:, self.prompt_length:]
        done = torch.isin(new, self.ids.to(new.device)).any(dim=1)  # cheap gate, then the exact test
        for row in done.nonzero().flatten().tolist():
            text = self.tokenizer.decode(new[row], skip_special_tokens=True)
            done[row] = "\n" in text.lstrip()
        return done


@torch.no_grad()
def generate_answers(model: nn.Module, tokenizer, items: Sequence[Any], *, max_new_tokens: int = 12,
                     batch_size: int = 16, progress: bool = True, model_inputs=None) -> list[str]:
    """Greedy continuation of each item, cut at the first line break and stripped.

    Items are prompts, tokenised with left padding; or anything ``model_inputs(batch_of_items)``
    turns into model inputs (a VLM's processor output with images), called with the tokenizer
    already set to pad on the left.
    """
    answers: list[str] = []
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bar = tqdm(total=len(items), desc="generating", disable=not progress)
    with padding_side(tokenizer, "left"):
        for chunk in _chunks(list(items), batch_size):
            inputs = model_inputs(chunk) if model_inputs else tokenizer(list(chunk), return_tensors="pt", padding=True)
            inputs = batch_to_device(inputs, device)
            stop = StoppingCriteriaList([StopAtLineBreak(tokenizer, inputs["input_ids"].shape[1])])
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                 stopping_criteria=stop)
            new = out[:, inputs["input_ids"].shape[1]:]
            for text in tokenizer.batch_decode(new, skip_special_tokens=True):
                answers.append(text.strip().split("\n")[0].strip())
            bar.update(len(chunk))
    bar.close()
    return answers


def answer_hits(predictions: Sequence[str], rows: Sequence[dict]) -> list[bool]:
    """Per row: whether its prediction exactly matches its "answer" or one of its "aliases"."""
    return [exact_match(p, [r["answer"], *(r.get("aliases") or [])]) for p, r in zip(predictions, rows)]


def answer_accuracy(predictions: Sequence[str], rows: Sequence[dict]) -> float:
    """Share of predictions that exactly match their row's "answer" or one of its "aliases"."""
    hits = answer_hits(predictions, rows)
    return sum(hits) / len(hits) if hits else float("nan")


def qa_exact_match(model: nn.Module, tokenizer, dataset, *, template: str = QA_TEMPLATE,
                   shots: Sequence[tuple[str, str]] = (), max_new_tokens: int = 12, batch_size: int = 16,
                   progress: bool = True) -> dict[str, Any]:
    """Exact match (normalised: case, punctuation, articles) of greedy answers to ``dataset``'s
    questions; rows need "question" and "answer", optionally "aliases" (other accepted answers).
    Returns {"exact_match": share, "n": rows, "predictions": [...], "hits": [bool per row]}."""
    rows = list(dataset)
    prompts = [qa_prompt(r["question"], template, shots) for r in rows]
    predictions = generate_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, progress=progress)
    hits = answer_hits(predictions, rows)
    return {"exact_match": sum(hits) / len(hits) if hits else float("nan"), "n": len(rows),
            "predictions": predictions, "hits": hits}


@torch.no_grad()
def continuation_logprobs(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], *,
                          batch_size: int = 16, progress: bool = False) -> list[float]:
    """Sum of log p(continuation tokens | context) for each (context, continuation) pair.

    Context and continuation are tokenised separately and concatenated, so the scored tokens are
    exactly the continuation's whatever the tokenizer would merge across the boundary.
    """
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores: list[float] = []
    for chunk in tqdm(list(_chunks(list(pairs), batch_size)), desc="scoring", disable=not progress):
        seqs, spans = [], []
        for context, continuation in chunk:
            ctx = tokenizer(context)["input_ids"]
            cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
            seqs.append(ctx + cont)
            spans.append((len(ctx), len(ctx) + len(cont)))
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, seq in enumerate(seqs):
            ids[i, :len(seq)] = torch.tensor(seq)
            mask[i, :len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(device))[..., 0]
        for i, (start, end) in enumerate(spans):
            scores.append(float(logp[i, start - 1:end - 1].sum()))
    return scores


def qa_loglik(model: nn.Module, tokenizer, dataset, *, distractors: int = 4, seed: int = 0,
              template: str = QA_TEMPLATE, shots: Sequence[tuple[str, str]] = (), batch_size: int = 16,
              progress: bool = True) -> dict[str, Any]:
    """Multiple choice by log-likelihood: the gold answer against ``distractors`` answers of
    other rows with the same "field" (seeded), scored as continuations of the QA prompt.
    Returns {"loglik_accuracy": share of rows where gold scores highest, "gold_logprob": mean}."""
    rows = list(dataset)
    pools: dict[Any, list[str]] = {}
    for r in rows:
        pools.setdefault(r.get("field"), []).append(r["answer"])
    rng = random.Random(seed)
    pairs, sizes = [], []
    for r in rows:
        others = sorted({a for a in pools[r.get("field")] if a != r["answer"]})
        options = [r["answer"]] + rng.sample(others, min(distractors, len(others)))
        prompt = qa_prompt(r["question"], template, shots)
        pairs.extend((prompt, " " + option) for option in options)
        sizes.append(len(options))
    scores = continuation_logprobs(model, tokenizer, pairs, batch_size=batch_size, progress=progress)
    correct, gold, at = 0, 0.0, 0
    for size in sizes:
        group = scores[at:at + size]
        correct += int(max(range(size), key=lambda i: (group[i], -i)) == 0)
        gold += group[0]
        at += size
    n = len(sizes)
    return {"loglik_accuracy": correct / n if n else float("nan"), "gold_logprob": gold / n if n else float("nan"),
            "n": n}


@torch.no_grad()
def text_perplexity(model: nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int = 8,
                    max_length: int = 512, progress: bool = True) -> dict[str, float]:
    """Perplexity of held-out ``texts`` (each scored on its own, padding masked). Also per text:
    "text_nll" (mean NLL per token) and "text_tokens" (tokens scored), for per-item statistics."""
    device = model_device(model)
    total, tokens = 0.0, 0
    text_nll, text_tokens = [], []
    with padding_side(tokenizer, "right"):
        for chunk in tqdm(list(_chunks(list(texts), batch_size)), desc="perplexity", disable=not progress):
            enc = tokenizer(list(chunk), return_tensors="pt", padding=True, truncation=True, max_length=max_length)
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
            keep = mask[:, 1:] * mask[:, :-1]
            per_text, counts = (nll * keep).sum(1), keep.sum(1)
            text_nll += [float(n) / max(int(c), 1) for n, c in zip(per_text, counts)]
            text_tokens += [int(c) for c in counts]
            total += float(per_text.sum())
            tokens += int(counts.sum())
    return {"perplexity": perplexity(total, tokens), "nll": total / tokens if tokens else float("nan"),
            "tokens": tokens, "text_nll": text_nll, "text_tokens": text_tokens}
