"""Offline datasets and batching helpers."""

from corda_vl.lab.data.countries import capital_questions, country_fact_texts, country_records
from corda_vl.lab.data.general_text import general_texts
from corda_vl.lab.data.glyphs import letters
from corda_vl.lab.data.images import colors, digits, fashion_mnist, from_datasets, image_folder, image_table, shapes
from corda_vl.lab.data.knowledge import country_splits, knowledge_calibration_texts, knowledge_qa, knowledge_shots
from corda_vl.lab.data.skills import skill_qa
from corda_vl.lab.data.text import padded_batches, token_blocks
from corda_vl.lab.data.vqa import easy_vqa
from corda_vl.lab.data.vqa_skills import vqa_skill

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
    "general_texts",
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
