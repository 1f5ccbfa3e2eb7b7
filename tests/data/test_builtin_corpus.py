"""Tests for the built-in English -> German number corpus."""

import pytest

from transformer.data.builtin import (
    builtin_splits,
    generate_pairs,
    number_to_english,
    number_to_german,
)

TRICKY_NUMBERS = [
    (0, "zero", "null"),
    (1, "one", "eins"),
    (7, "seven", "sieben"),
    (11, "eleven", "elf"),
    (16, "sixteen", "sechzehn"),
    (17, "seventeen", "siebzehn"),
    (21, "twenty-one", "einundzwanzig"),
    (30, "thirty", "dreißig"),
    (60, "sixty", "sechzig"),
    (70, "seventy", "siebzig"),
    (99, "ninety-nine", "neunundneunzig"),
    (100, "one hundred", "einhundert"),
    (101, "one hundred one", "einhunderteins"),
    (111, "one hundred eleven", "einhundertelf"),
    (345, "three hundred forty-five", "dreihundertfünfundvierzig"),
    (1000, "one thousand", "eintausend"),
    (1001, "one thousand one", "eintausendeins"),
    (12005, "twelve thousand five", "zwölftausendfünf"),
    (21000, "twenty-one thousand", "einundzwanzigtausend"),
    (101000, "one hundred one thousand", "einhunderteintausend"),
    (
        999999,
        "nine hundred ninety-nine thousand nine hundred ninety-nine",
        "neunhundertneunundneunzigtausendneunhundertneunundneunzig",
    ),
]

ENGLISH_NUMBER_WORDS = {
    word for n in list(range(100)) + [100, 1000] for part in number_to_english(n).split() for word in part.split("-")
}


@pytest.mark.parametrize(("n", "english", "german"), TRICKY_NUMBERS)
def test_number_words(n: int, english: str, german: str) -> None:
    assert number_to_english(n) == english
    assert number_to_german(n) == german


@pytest.mark.parametrize("n", [-1, 1_000_000])
def test_numbers_out_of_range_are_rejected(n: int) -> None:
    with pytest.raises(ValueError):
        number_to_english(n)
    with pytest.raises(ValueError):
        number_to_german(n)


# English ending -> German ending, covering gender, case and adjective endings.
PHRASE_ENDINGS = {
    "have one dog.": "einen Hund.",
    "have one cat.": "eine Katze.",
    "have one car.": "ein Auto.",
    "is one dog.": "einen Hund.",
    "red apples.": "rote Äpfel.",
    "twenty-one apples.": "einundzwanzig Äpfel.",
    "dog is red.": "Hund ist rot.",
    "cars are big.": "Autos sind groß.",
}


def test_phrases_have_correct_grammar() -> None:
    pairs = generate_pairs(20000, seed=0)
    found = set()
    for en, de in pairs:
        for en_end, de_end in PHRASE_ENDINGS.items():
            if en.endswith(" " + en_end):
                assert de.endswith(de_end), (en, de)
                found.add(en_end)
        if en.startswith("the ") and " red " in en:
            assert " roten " in de, (en, de)
    assert found == set(PHRASE_ENDINGS)


def test_generate_pairs_is_deterministic() -> None:
    assert generate_pairs(300, seed=1) == generate_pairs(300, seed=1)
    assert generate_pairs(300, seed=1) != generate_pairs(300, seed=2)


def test_generate_pairs_shape_and_content() -> None:
    pairs = generate_pairs(2000, seed=3)
    assert len(pairs) == 2000
    bare_numbers = 0
    for en, de in pairs:
        assert en.strip() and de.strip()
        assert len(en.split()) < 15
        assert "-" not in de
        assert not ENGLISH_NUMBER_WORDS & set(de.lower().split()), (en, de)
        bare_numbers += " " not in de
    assert 0.3 < bare_numbers / len(pairs) < 0.5


def test_builtin_splits_sizes_and_disjointness() -> None:
    splits = builtin_splits(2000, 200, 300, seed=4)
    assert {name: len(pairs) for name, pairs in splits.items()} == {
        "train": 2000,
        "valid": 200,
        "test": 300,
    }
    sources = {name: {en for en, _ in pairs} for name, pairs in splits.items()}
    assert not sources["train"] & sources["valid"]
    assert not sources["train"] & sources["test"]
    assert not sources["valid"] & sources["test"]
    assert len(sources["valid"]) == 200 and len(sources["test"]) == 300
    assert splits["train"] == generate_pairs(2000, seed=4)
    assert splits == builtin_splits(2000, 200, 300, seed=4)
