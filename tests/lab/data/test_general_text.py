"""The general-text sample of the forgetting metric: offline, fixed, prose, and replaceable."""

import pytest

from corda_vl import CordaError
from corda_vl.lab.data import general_texts, knowledge_calibration_texts
from corda_vl.lab.data.general_text import MIN_WORDS


def test_the_default_sample_is_fixed_prose_unrelated_to_calibration():
    texts = general_texts(200)
    assert texts == general_texts(200) and len(set(texts)) == 200
    assert all(len(t.split()) >= MIN_WORDS and "\n" not in t and ">>>" not in t for t in texts)
    calibration = set(knowledge_calibration_texts(128, seed=0))
    assert not calibration & set(texts)
    assert general_texts(20) == texts[:20]  # a smaller sample is a prefix: the same items


def test_a_file_of_your_own_replaces_it(tmp_path):
    words = " ".join(["word"] * MIN_WORDS)
    path = tmp_path / "mine.txt"
    path.write_text(f"{words} one\n\n    code block {words}\n\n{words} two\n\nshort\n")
    assert sorted(general_texts(2, path=path)) == [f"{words} one", f"{words} two"]
    with pytest.raises(CordaError, match="3 were asked"):
        general_texts(3, path=path)
