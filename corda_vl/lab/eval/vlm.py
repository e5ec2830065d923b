"""Vision-language evaluators for LLaVA-style models (adapters attached, nothing merged): VQA
accuracy on held-out questions by greedy generation and normalised exact match. Text-only
knowledge QA through the same model is :func:`corda_vl.lab.eval.llm.qa_exact_match` with the LLaVA
model and its tokenizer (no image in the prompt)."""

from __future__ import annotations

from typing import Any

from torch import nn

from corda_vl.lab.eval.llm import answer_hits, generate_answers

VQA_TEMPLATE = "<image>\nQuestion: {question}\nAnswer:"


def vqa_accuracy(model: nn.Module, processor: Any, dataset, *, template: str = VQA_TEMPLATE,
                 max_new_tokens: int = 8, batch_size: int = 8, progress: bool = True) -> dict[str, Any]:
    """Share of rows ("image", "question", "answer", optional "aliases") answered exactly.

    ``processor`` is the model's ``LlavaProcessor`` (or anything called as
    ``processor(text=..., images=..., return_tensors="pt", padding=True)`` with a ``.tokenizer``);
    it expands the template's ``<image>`` into the image tokens the model expects.
    """
    rows = list(dataset)

    def inputs(chunk):
        prompts = [template.format(question=r["question"]) for r in chunk]
        return dict(processor(text=prompts, images=[r["image"] for r in chunk], return_tensors="pt", padding=True))

    predictions = generate_answers(model, processor.tokenizer, rows, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, progress=progress, model_inputs=inputs)
    hits = answer_hits(predictions, rows)
    return {"vqa_accuracy": sum(hits) / len(hits) if hits else float("nan"), "n": len(rows),
            "predictions": predictions, "hits": hits}
