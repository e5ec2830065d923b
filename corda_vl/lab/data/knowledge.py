"""Knowledge QA from countryinfo beyond capitals: region, official languages and currencies.

Splits are made by country, not by question, so a model calibrated (or trained) on one split
never sees a fact about an evaluation country: retention is measured on knowledge the
adaptation data did not touch. The split of a country depends only on ``seed`` and the
country list, never on ``fields``, so benchmarks built from different fields stay aligned.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from corda_vl.errors import CordaError
from corda_vl.lab.resources import load_json_asset
from corda_vl.lab.data.countries import country_records

if TYPE_CHECKING:
    from datasets import DatasetDict

FIELDS = ("capital", "region", "languages", "currencies")
# Fractions of countries per split, in this order; "eval" takes the rest (~50 %).
SPLITS = (("calibration", 0.3), ("train", 0.2), ("eval", 0.5))
# ISO 4217 fund / accounting codes (not money anyone would name as "the currency of X").
FUND_CODES = frozenset({"BOV", "CHE", "CHW", "CLF", "COU", "MXV", "USN", "USS", "UYI", "UYW", "XSU", "XUA"})
_YEARS = re.compile(r"\s*\([^)]*\d{4}[^)]*\)$")  # babel's "(2000–2016)" on superseded currencies


class KnowledgeError(CordaError):
    """A knowledge QA request names a field we cannot build questions for."""


@lru_cache(maxsize=None)
def language_name(code: str) -> str | None:
    """English name of a countryinfo language entry (ISO 639 code, or already a name); None if unknown."""
    from babel import Locale

    if not code.islower():  # countryinfo lists a few languages by name ("Scottish Gaelic")
        return code
    return Locale("en").languages.get(code)


@lru_cache(maxsize=None)
def currency_name(code: str) -> str | None:
    """English name of an ISO 4217 currency code; None for funds and codes babel does not know."""
    from babel.numbers import get_currency_name

    if code in FUND_CODES:
        return None
    name = get_currency_name(code, locale="en")
    return _YEARS.sub("", name) if name != code else None


def _answers(record: dict, field: str) -> list[str]:
    """Acceptable answers for one fact, the canonical one first; empty when the country lacks it."""
    if field == "capital":
        return [record["capital"]]
    if field == "region":
        return [a for a in (record["region"], record["subregion"]) if a]
    if field == "languages":
        names = [language_name(c) for c in record["language_codes"]]
        return list(dict.fromkeys(n for n in names if n))
    codes = [c for c in record["currency_codes"] if currency_name(c)]  # "currencies"
    return list(dict.fromkeys([currency_name(c) for c in codes] + codes))


def _check_fields(fields: tuple[str, ...]) -> None:
    """Refuse unknown fields before any work (``_answers`` trusts its field)."""
    for field in fields:
        if field not in FIELDS:
            raise KnowledgeError(f"knowledge_qa: unknown field {field!r}; choose from {FIELDS}.")


def country_splits(seed: int = 0) -> dict[str, str]:
    """Country name -> split name: a seeded permutation of the sorted countries, cut by ``SPLITS``."""
    names = sorted({r["name"] for r in country_records()})
    order = np.random.default_rng(seed).permutation(len(names))
    out, start = {}, 0
    for i, (split, fraction) in enumerate(SPLITS):
        stop = len(names) if i == len(SPLITS) - 1 else start + round(fraction * len(names))
        out.update({names[j]: split for j in order[start:stop]})
        start = stop
    return out


def knowledge_qa(fields: tuple[str, ...] = FIELDS, seed: int = 0) -> DatasetDict:
    """Country-fact questions split by country into "calibration" (30 %), "train" (20 %) and
    "eval" (50 %). Columns: question, answer, aliases (every acceptable answer, answer first),
    field, country. Countries lacking a field get no question for it. Rows are sorted by
    country then by ``fields`` order, so the same arguments always give the same datasets."""
    from datasets import Dataset, DatasetDict, Features, Sequence, Value

    _check_fields(fields)
    templates = load_json_asset("templates/knowledge.json")
    split_of = country_splits(seed)
    rows: dict[str, list[dict]] = {split: [] for split, _ in SPLITS}
    for record in country_records():
        for field in fields:
            answers = _answers(record, field)
            if answers:
                rows[split_of[record["name"]]].append({
                    "question": templates[f"{field}_question"].format(**record), "answer": answers[0],
                    "aliases": answers, "field": field, "country": record["name"]})
    features = Features({"question": Value("string"), "answer": Value("string"),
                         "aliases": Sequence(Value("string")), "field": Value("string"),
                         "country": Value("string")})
    return DatasetDict({split: Dataset.from_list(r, features=features) for split, r in rows.items()})


def knowledge_shots(n: int = 3, field: str = "capital", seed: int = 0) -> list[tuple[str, str]]:
    """(question, answer) few-shot examples from the calibration split, of the most populous
    countries: well-known facts show the answer format without teaching anything the evaluation
    asks. (Shots picked by name order started with Anguilla -> "The Valley", and SmolLM2 then
    answered "The ..." to everything: 15 % exact match on capitals against 40 % with these.)"""
    _check_fields((field,))
    template = load_json_asset("templates/knowledge.json")[f"{field}_question"]
    split_of = country_splits(seed)
    records = [r for r in country_records() if split_of[r["name"]] == "calibration" and _answers(r, field)]
    records.sort(key=lambda r: (-r["population"], r["name"]))
    return [(template.format(**r), _answers(r, field)[0]) for r in records[:n]]


def knowledge_calibration_texts(n: int, seed: int = 0) -> list[str]:
    """What KPM calibrates on to keep capital-city knowledge: the capital Q&A of the calibration
    countries in the QA prompt format ("Question: ...\\nAnswer: Paris") and their fact paragraphs,
    a seeded sample of ``n`` (evaluation countries never appear)."""
    import random

    from corda_vl.lab.eval.llm import qa_prompt
    from corda_vl.lab.data.countries import country_fact_texts

    calib = knowledge_qa(fields=("capital",), seed=seed)["calibration"]
    texts = [qa_prompt(q) + f" {a}" for q, a in zip(calib["question"], calib["answer"])]
    split_of = country_splits(seed)
    facts = dict(zip((r["name"] for r in country_records()), country_fact_texts()))
    texts += [facts[name] for name in sorted(facts) if split_of.get(name) == "calibration"]
    return random.Random(seed).sample(texts, min(n, len(texts)))
