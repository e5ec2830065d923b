"""Evaluators usable with adapters attached (nothing merged), batched and deterministic.

* CLIP zero-shot (transformers and open_clip): :func:`clip_encoder`, :func:`zero_shot_eval`
* LLM knowledge: :func:`qa_exact_match`, :func:`qa_loglik`, :func:`text_perplexity`
* LLaVA: :func:`vqa_accuracy` (text-only knowledge QA: :func:`qa_exact_match` on the LLaVA model)
* Retention: :func:`evaluate_retention`, :func:`mean_relative_retention`, :func:`zscl_metrics`
"""

from corda_vl.lab.eval.clip import build_zero_shot_classifier, clip_encoder, zero_shot_eval, zero_shot_templates
from corda_vl.lab.eval.llm import qa_exact_match, qa_loglik, text_perplexity
from corda_vl.lab.eval.metrics import exact_match, normalize_answer, zscl_metrics
from corda_vl.lab.eval.retention import evaluate_retention, mean_relative_retention
from corda_vl.lab.eval.vlm import vqa_accuracy

__all__ = ["build_zero_shot_classifier", "clip_encoder", "evaluate_retention", "exact_match", "mean_relative_retention",
           "normalize_answer", "qa_exact_match", "qa_loglik", "text_perplexity", "vqa_accuracy", "zero_shot_eval",
           "zero_shot_templates", "zscl_metrics"]
