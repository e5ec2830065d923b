"""Offline data helpers."""

import torch

from corda_vl.lab.data import capital_questions, country_fact_texts, country_records, padded_batches, token_blocks


class CharTokenizer:
    """A stand-in tokenizer: one id per character, 0 = padding/eos."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=True, return_tensors=None, padding=False, **_):
        if isinstance(texts, str):
            return {"input_ids": [ord(c) % 90 + 1 for c in texts]}
        rows = [[ord(c) % 90 + 1 for c in t] for t in texts]
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def test_country_data_is_stable_and_complete():
    records = country_records()
    assert len(records) == 250 and records == tuple(sorted(records, key=lambda r: r["name"]))
    questions = dict(capital_questions())
    assert questions["What is the capital of France?"] == "Paris"
    assert len(country_fact_texts()) == len(records)
    assert "Its capital is Tokyo." in next(t for t in country_fact_texts() if t.startswith("Japan "))


def test_token_blocks_have_exact_shape_and_no_padding():
    batches = token_blocks(CharTokenizer(), ["hello world", "abc"], n_blocks=5, block_len=7, batch_size=2)
    assert [b["input_ids"].shape for b in batches] == [(2, 7), (2, 7), (1, 7)]
    assert all(bool(b["attention_mask"].all()) for b in batches)


def test_padded_batches_mask_padding():
    (batch,) = padded_batches(CharTokenizer(), ["ab", "abcd"], batch_size=2)
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_knowledge_calibration_texts_are_seeded_and_hold_no_evaluation_country():
    from corda_vl.lab.data import knowledge_calibration_texts

    texts = knowledge_calibration_texts(64, seed=0)
    assert len(texts) == 64 == len(set(texts)) and texts == knowledge_calibration_texts(64, seed=0)
    assert any(t.startswith("Question:") for t in texts) and not all(t.startswith("Question:") for t in texts)
    from corda_vl.lab.data import knowledge_qa

    evaluated = set(knowledge_qa(fields=("capital",), seed=0)["eval"]["question"])
    assert not any(q in t for q in evaluated for t in texts)
