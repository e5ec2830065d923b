"""LLM evaluators on a tiny LLaMA with a word-level tokenizer: batching, direct computations,
and identical numbers with an initialised CorDA adapter attached."""

import pytest
import torch
from conftest import text_batches, tiny_llama, tiny_tokenizer

from corda_vl import CordaConfig, build_corda, collect_covariances
from corda_vl.lab.eval.llm import continuation_logprobs, qa_exact_match, qa_loglik, qa_prompt, text_perplexity

ROWS = [{"question": "What is the capital of France?", "answer": "paris", "field": "capital"},
        {"question": "What is the capital of Japan?", "answer": "tokyo", "field": "capital"},
        {"question": "What is the capital of Italy?", "answer": "rome", "aliases": ["roma"], "field": "capital"},
        {"question": "What is the capital of Spain?", "answer": "madrid", "field": "capital"},
        {"question": "What is the capital of Germany?", "answer": "berlin", "field": "capital"}]
TEXTS = ["france is a country . its capital is paris .", "water boils at one", "the people are called w3 w4 w5"]


@pytest.fixture
def tok():
    return tiny_tokenizer()


def test_batched_generation_equals_one_by_one(llama, tok):
    batched = qa_exact_match(llama, tok, ROWS, batch_size=4, progress=False)
    single = qa_exact_match(llama, tok, ROWS, batch_size=1, progress=False)
    assert batched["predictions"] == single["predictions"] and batched["n"] == 5
    # answers equal to the predictions score 1; aliases count
    rows = [dict(r, answer="w0", aliases=[p]) for r, p in zip(ROWS, batched["predictions"])]
    assert qa_exact_match(llama, tok, rows, progress=False)["exact_match"] == 1.0
    assert tok.padding_side == "right"  # restored


def test_continuation_logprob_equals_a_direct_computation(llama, tok):
    context, continuation = qa_prompt(ROWS[0]["question"]), " paris"
    ids = tok(context)["input_ids"] + tok(continuation, add_special_tokens=False)["input_ids"]
    n = len(tok(continuation, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(llama(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    direct = sum(float(logp[i - 1, ids[i]]) for i in range(len(ids) - n, len(ids)))
    scores = continuation_logprobs(llama, tok, [(context, continuation), (qa_prompt(ROWS[1]["question"]), " a b")])
    assert scores[0] == pytest.approx(direct, abs=1e-4)


def test_perplexity_equals_a_direct_computation(llama, tok):
    out = text_perplexity(llama, tok, TEXTS, batch_size=2, progress=False)
    total, count = 0.0, 0
    for text in TEXTS:
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            logits = llama(input_ids=ids).logits[0].float()
        total += float(torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    assert out["tokens"] == count
    assert out["perplexity"] == pytest.approx(torch.exp(torch.tensor(total / count)).item(), rel=1e-5)


def test_loglik_choice_is_deterministic_and_in_range(llama, tok):
    a = qa_loglik(llama, tok, ROWS, distractors=3, progress=False)
    b = qa_loglik(llama, tok, ROWS, distractors=3, progress=False)
    assert a == b and 0.0 <= a["loglik_accuracy"] <= 1.0 and a["n"] == 5 and a["gold_logprob"] < 0


def test_identical_with_an_initialised_corda_adapter(tok):
    model = tiny_llama()
    before = (qa_exact_match(model, tok, ROWS, progress=False), qa_loglik(model, tok, ROWS, progress=False),
              text_perplexity(model, tok, TEXTS, progress=False))
    store = collect_covariances(model, text_batches(), progress=False)
    peft_model = build_corda(model, store, CordaConfig(r=4), progress=False)
    after = (qa_exact_match(peft_model, tok, ROWS, progress=False), qa_loglik(peft_model, tok, ROWS, progress=False),
             text_perplexity(peft_model, tok, TEXTS, progress=False))
    assert after[0]["predictions"] == before[0]["predictions"]
    assert after[1]["loglik_accuracy"] == before[1]["loglik_accuracy"]
    assert after[1]["gold_logprob"] == pytest.approx(before[1]["gold_logprob"], abs=1e-4)
    assert after[2]["perplexity"] == pytest.approx(before[2]["perplexity"], rel=1e-5)


def test_generation_stops_at_a_line_break_with_the_same_answers(llama, tok, monkeypatch):
    """Once a row's answer holds a line break after some text, the row stops: the answers are
    those that generating to max_new_tokens and cutting gives, in fewer forward passes. A line
    break before any text (stripped when the answer is cut) does not stop it."""
    import corda_vl.lab.eval.llm as llm

    prompts = [qa_prompt(r["question"]) for r in ROWS]
    free = llm.generate_answers(llama, tok, prompts, max_new_tokens=8, batch_size=5, progress=False)
    assert free[0].split()[0] == free[1].split()[0]  # every row starts with the same word
    breaks = {tok.convert_tokens_to_ids(free[0].split()[0]), tok.convert_tokens_to_ids(free[1].split()[2])}
    one = tok.decode
    as_text = lambda t, k: "\n" if int(t) in breaks else one([int(t)], **k)  # noqa: E731
    monkeypatch.setattr(tok, "batch_decode", lambda seqs, **k: [" ".join(as_text(t, k) for t in s) for s in seqs])
    monkeypatch.setattr(tok, "decode", lambda s, **k: " ".join(as_text(t, k) for t in s))
    llm._LINE_BREAK_IDS.clear()
    assert sorted(llm.line_break_ids(tok).tolist()) == sorted(breaks)
    calls = []
    llama.register_forward_hook(lambda *a: calls.append(1))
    stopped = llm.generate_answers(llama, tok, prompts, max_new_tokens=8, batch_size=5, progress=False)
    calls.clear()
    llm.generate_answers(llama, tok, prompts[1:2], max_new_tokens=8, progress=False)
    assert len(calls) == 3  # row 1 stops at its break, the third token
    monkeypatch.setattr(llm, "line_break_ids", lambda t: torch.tensor([-1]))  # never stops
    calls.clear()
    cut = llm.generate_answers(llama, tok, prompts, max_new_tokens=8, batch_size=5, progress=False)
    llm._LINE_BREAK_IDS.clear()
    assert stopped == cut and stopped[1] == free[1].split()[1]  # the leading break is skipped
    assert len(calls) == 8
