import json
from pathlib import Path

import pytest

from cpgan.errors import CpganError
from cpgan.pipeline.text import BOS_ID, SPECIALS, UNK_ID, Vocabulary, build_vocabulary, tokenize


def test_tokenize_is_attngan_style():
    assert tokenize("A small Red-circle, left of   the café!") == ["a", "small", "red", "circle", "left", "of", "the", "caf"]
    assert tokenize("...!!!") == []
    assert tokenize("日本 語") == []
    assert tokenize("two_dogs 3 cats") == ["two_dogs", "3", "cats"]


def test_vocabulary_order_counts_and_min_count():
    captions = ["a red ball", "A red box.", "a blue ball", "zebra"]
    vocab = build_vocabulary(captions, min_count=2)
    assert vocab.tokens == SPECIALS + ("a", "ball", "red")
    assert vocab.counts == (0, 0, 0, 0, 3, 2, 2)
    assert vocab.encode("a zebra ball", max_words=18) == [4, UNK_ID, 5]
    assert build_vocabulary(reversed(captions), 2) == vocab  # order of arrival does not matter


def test_encode_keeps_first_max_words():
    vocab = build_vocabulary(["one two three four"], 1)
    assert vocab.decode(vocab.encode("one two three four", max_words=2)) == ["one", "two"]


def test_round_trip_and_validation(tmp_path: Path):
    vocab = build_vocabulary(["a red ball", "a blue box"], 1)
    path = tmp_path / "vocab.json"
    vocab.save(path)
    data = json.loads(path.read_text())
    assert set(data) == {"tokens", "counts", "min_count"} and data["tokens"][BOS_ID] == "<bos>"
    assert Vocabulary.load(path) == vocab

    bad = {
        "not json": "{",
        "wrong specials": json.dumps({"tokens": ["a"], "counts": [1], "min_count": 1}),
        "length": json.dumps({"tokens": list(SPECIALS) + ["a"], "counts": [0], "min_count": 1}),
        "duplicate": json.dumps({"tokens": list(SPECIALS) + ["a", "a"], "counts": [0] * 6, "min_count": 1}),
    }
    for name, text in bad.items():
        path.write_text(text)
        with pytest.raises(CpganError) as info:
            Vocabulary.load(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value), name
    with pytest.raises(CpganError, match="not found"):
        Vocabulary.load(tmp_path / "missing.json")
