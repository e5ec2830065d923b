"""Generated skills a language model cannot already do, for the "learn something new, keep what
you know" recipes. Rows are question / answer pairs (the columns the QA evaluators read), drawn
from a seeded generator, so the same seed always gives the same data and train and eval rows
never coincide (eval rows are drawn from their own stream and any repeat of a train row is
dropped).

SmolLM2-135M-Instruct answers 0 of 64 "reverse the list" questions zero-shot (it says "10" or
"The list is ..."), and learns the skill within a few dozen LoRA steps.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from corda_vl.errors import CordaError

if TYPE_CHECKING:
    from datasets import DatasetDict


def _reverse_row(rng: random.Random, min_len: int, max_len: int) -> tuple[str, str]:
    digits = [str(rng.randint(0, 9)) for _ in range(rng.randint(min_len, max_len))]
    return f"Reverse the list: {' '.join(digits)}", " ".join(reversed(digits))


def _sort_row(rng: random.Random, min_len: int, max_len: int) -> tuple[str, str]:
    digits = [str(rng.randint(0, 9)) for _ in range(rng.randint(min_len, max_len))]
    return f"Sort the list: {' '.join(digits)}", " ".join(sorted(digits))


SKILLS = {"reverse": _reverse_row, "sort": _sort_row}


def skill_qa(skill: str = "reverse", n_train: int = 2000, n_eval: int = 200, *, min_len: int = 4,
             max_len: int = 6, seed: int = 0) -> DatasetDict:
    """A generated skill as "train" / "eval" rows with columns question, answer.

    ``reverse``: "Reverse the list: 4 7 1" -> "1 7 4"; ``sort``: "Sort the list: 4 7 1" -> "1 4 7";
    lists of ``min_len``..``max_len`` digits."""
    from datasets import Dataset, DatasetDict

    if skill not in SKILLS:
        raise CordaError(f"unknown skill {skill!r}; choose one of {sorted(SKILLS)}.")
    if not 1 <= min_len <= max_len:
        raise CordaError(f"skill_qa needs 1 <= min_len <= max_len, got {min_len}, {max_len}.")
    make = SKILLS[skill]
    train_rng, eval_rng = random.Random(f"{seed}/train"), random.Random(f"{seed}/eval")
    train = [make(train_rng, min_len, max_len) for _ in range(n_train)]
    seen, held_out = {q for q, _ in train}, []
    for _ in range(50 * n_eval):
        if len(held_out) == n_eval:
            break
        row = make(eval_rng, min_len, max_len)
        if row[0] not in seen:
            seen.add(row[0])
            held_out.append(row)
    if len(held_out) < n_eval:
        raise CordaError(f"skill_qa: only {len(held_out)} distinct eval rows exist beside {n_train} train rows; "
                         "lower n_eval or n_train, or raise max_len.")
    return DatasetDict({split: Dataset.from_dict({"question": [q for q, _ in rows], "answer": [a for _, a in rows]})
                        for split, rows in (("train", train), ("eval", held_out))})
