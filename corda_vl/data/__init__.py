"""Offline datasets and batching helpers."""

from .countries import capital_questions, country_fact_texts, country_records
from .glyphs import letters
from .images import colors, digits, fashion_mnist, from_datasets, image_folder, image_table, shapes
from .knowledge import country_splits, knowledge_calibration_texts, knowledge_qa, knowledge_shots
from .skills import skill_qa
from .text import padded_batches, token_blocks
from .vqa import easy_vqa
from .vqa_skills import vqa_skill

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
    "knowledge_calibration_texts",
    "knowledge_qa",
    "knowledge_shots",
    "letters",
    "padded_batches",
    "shapes",
    "skill_qa",
    "token_blocks",
    "vqa_skill",
]
