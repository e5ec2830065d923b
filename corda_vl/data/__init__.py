"""Offline datasets and batching helpers."""

from .countries import capital_questions, country_fact_texts, country_records
from .images import colors, digits, fashion_mnist, from_datasets, image_folder, image_table, shapes
from .knowledge import country_splits, knowledge_qa, knowledge_shots
from .text import padded_batches, token_blocks
from .vqa import easy_vqa

__all__ = [
    "capital_questions",
    "colors",
    "country_fact_texts",
    "country_records",
    "country_splits",
    "digits",
    "easy_vqa",
    "fashion_mnist",
    "from_datasets",
    "image_folder",
    "image_table",
    "knowledge_qa",
    "knowledge_shots",
    "padded_batches",
    "shapes",
    "token_blocks",
]
