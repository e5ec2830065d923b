"""Country facts from the ``countryinfo`` package (MIT, offline): the knowledge we measure and
calibrate on. Records are sorted by name, so everything built on them is deterministic."""

from __future__ import annotations

from functools import lru_cache

from corda_vl.lab.resources import load_json_asset


def _templates() -> dict[str, str]:
    return load_json_asset("templates/knowledge.json")


@lru_cache(maxsize=1)
def country_records() -> tuple[dict, ...]:
    """One dict per country with a capital: name, capital, region, subregion, demonym, population,
    and countryinfo's raw ``language_codes`` (ISO 639, a few plain names) and ``currency_codes``
    (ISO 4217) as tuples; ``corda_vl.lab.data.knowledge`` turns the codes into names."""
    from countryinfo import CountryInfo

    records = []
    for data in CountryInfo.all().values():
        if not data.get("capital") or not data.get("name"):
            continue
        records.append({
            "name": data["name"],
            "capital": data["capital"],
            "region": data.get("region") or "",
            "subregion": data.get("subregion") or "",
            "demonym": data.get("demonym") or "",
            "population": int(data.get("population") or 0),
            "language_codes": tuple(data.get("languages") or ()),
            "currency_codes": tuple(data.get("currencies") or ()),
        })
    return tuple(sorted(records, key=lambda r: r["name"]))


def country_fact_texts() -> list[str]:
    """A short encyclopaedic paragraph per country (plain text for calibration and benchmarks)."""
    t = _templates()
    texts = []
    for r in country_records():
        text = t["country_fact"].format(where=r["subregion"] or r["region"] or "the world", **r)
        if r["demonym"]:
            text += t["country_demonym"].format(**r)
        if r["population"]:
            text += t["country_population"].format(**r)
        texts.append(text)
    return texts


def capital_questions() -> list[tuple[str, str]]:
    """(question, answer) pairs: "What is the capital of France?" -> "Paris"."""
    template = _templates()["capital_question"]
    return [(template.format(**r), r["capital"]) for r in country_records()]
