"""Offline datasets and batching helpers."""

from .countries import capital_questions, country_fact_texts, country_records
from .text import padded_batches, token_blocks

__all__ = ["capital_questions", "country_fact_texts", "country_records", "padded_batches", "token_blocks"]
