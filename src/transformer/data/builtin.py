"""A built-in English -> German parallel corpus, generated offline.

The package ships this corpus so that a model can be trained and evaluated
without downloading anything. It is a real translation task rather than a copy
task: English number words must be reordered and compounded into German
("twenty-one" -> "einundzwanzig", "three hundred forty-five" ->
"dreihundertfünfundvierzig"), and short phrases need German gender, case,
plural and adjective endings ("I have one red apple." -> "Ich habe einen roten
Apfel.").

Every English input has exactly one correct German output and the vocabulary
is small, so a small Transformer can learn the task in minutes on a CPU.
Generation uses only ``random.Random(seed)``, so the same arguments give the
same corpus in any process.

German conventions: 1 alone is "eins", inside compounds "ein"; hundreds and
thousands always carry their multiplier ("einhundert", "eintausend").
Tokens, including punctuation, are separated by single spaces.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

MAX_NUMBER = 999_999

# --------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------

_EN_UNITS = (
    "zero one two three four five six seven eight nine ten eleven twelve "
    "thirteen fourteen fifteen sixteen seventeen eighteen nineteen"
).split()
_EN_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()

_DE_UNITS = (
    "null eins zwei drei vier fünf sechs sieben acht neun zehn elf zwölf "
    "dreizehn vierzehn fünfzehn sechzehn siebzehn achtzehn neunzehn"
).split()
_DE_TENS = "_ _ zwanzig dreißig vierzig fünfzig sechzig siebzig achtzig neunzig".split()


def _check_range(n: int) -> None:
    """Reject numbers outside the supported 0..999,999."""
    if not 0 <= n <= MAX_NUMBER:
        raise ValueError(f"number must be in 0..{MAX_NUMBER}, got {n}")


def _english_below_1000(n: int) -> str:
    """English words for 1..999, e.g. "one hundred twenty-three"."""
    hundreds, rest = divmod(n, 100)
    words = []
    if hundreds:
        words.append(f"{_EN_UNITS[hundreds]} hundred")
    if rest >= 20:
        tens, units = divmod(rest, 10)
        words.append(_EN_TENS[tens] + (f"-{_EN_UNITS[units]}" if units else ""))
    elif rest:
        words.append(_EN_UNITS[rest])
    return " ".join(words)


def number_to_english(n: int) -> str:
    """English words for 0..999,999: hyphens for 21-99, no "and"."""
    _check_range(n)
    if n == 0:
        return _EN_UNITS[0]
    thousands, rest = divmod(n, 1000)
    words = []
    if thousands:
        words.append(f"{_english_below_1000(thousands)} thousand")
    if rest:
        words.append(_english_below_1000(rest))
    return " ".join(words)


def _german_digit_prefix(d: int) -> str:
    """A digit 1..9 as the first part of a compound ("ein", "zwei", ...)."""
    return "ein" if d == 1 else _DE_UNITS[d]


def _german_below_1000(n: int, final: bool) -> str:
    """German compound for 1..999.

    ``final`` says whether the word ends the whole number: a trailing 1 is
    then "eins" ("einhunderteins"), otherwise "ein" ("einhunderteintausend").
    """
    hundreds, rest = divmod(n, 100)
    word = f"{_german_digit_prefix(hundreds)}hundert" if hundreds else ""
    if rest == 1:
        word += "eins" if final else "ein"
    elif rest < 20:
        word += _DE_UNITS[rest] if rest else ""
    else:
        tens, units = divmod(rest, 10)
        word += (f"{_german_digit_prefix(units)}und" if units else "") + _DE_TENS[tens]
    return word


def number_to_german(n: int) -> str:
    """German compound word for 0..999,999, e.g. "zwölftausendfünf"."""
    _check_range(n)
    if n == 0:
        return _DE_UNITS[0]
    thousands, rest = divmod(n, 1000)
    word = f"{_german_below_1000(thousands, final=False)}tausend" if thousands else ""
    if rest:
        word += _german_below_1000(rest, final=True)
    return word


# --------------------------------------------------------------------------
# Vocabulary for phrases
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Noun:
    en: str
    en_plural: str
    de: str
    de_plural: str
    gender: str  # "m", "f" or "n"


@dataclass(frozen=True)
class _Verb:
    en: str
    en_3sg: str
    de: tuple[str, str, str, str]  # forms for ich, du, er/sie, wir/sie


_NOUNS = (
    _Noun("dog", "dogs", "Hund", "Hunde", "m"),
    _Noun("cat", "cats", "Katze", "Katzen", "f"),
    _Noun("horse", "horses", "Pferd", "Pferde", "n"),
    _Noun("bird", "birds", "Vogel", "Vögel", "m"),
    _Noun("apple", "apples", "Apfel", "Äpfel", "m"),
    _Noun("book", "books", "Buch", "Bücher", "n"),
    _Noun("house", "houses", "Haus", "Häuser", "n"),
    _Noun("car", "cars", "Auto", "Autos", "n"),
    _Noun("tree", "trees", "Baum", "Bäume", "m"),
    _Noun("flower", "flowers", "Blume", "Blumen", "f"),
    _Noun("chair", "chairs", "Stuhl", "Stühle", "m"),
    _Noun("table", "tables", "Tisch", "Tische", "m"),
    _Noun("bottle", "bottles", "Flasche", "Flaschen", "f"),
    _Noun("cup", "cups", "Tasse", "Tassen", "f"),
    _Noun("key", "keys", "Schlüssel", "Schlüssel", "m"),
    _Noun("glass", "glasses", "Glas", "Gläser", "n"),
    _Noun("egg", "eggs", "Ei", "Eier", "n"),
    _Noun("boat", "boats", "Boot", "Boote", "n"),
)

# English adjective -> German stem; all stems take regular endings.
_ADJECTIVES = (
    ("red", "rot"),
    ("blue", "blau"),
    ("green", "grün"),
    ("big", "groß"),
    ("small", "klein"),
    ("old", "alt"),
    ("new", "neu"),
)

_VERBS = (
    _Verb("have", "has", ("habe", "hast", "hat", "haben")),
    _Verb("see", "sees", ("sehe", "siehst", "sieht", "sehen")),
    _Verb("buy", "buys", ("kaufe", "kaufst", "kauft", "kaufen")),
    _Verb("need", "needs", ("brauche", "brauchst", "braucht", "brauchen")),
)

# (English, German, index into _Verb.de); "you" is always rendered as "du".
_SUBJECTS = (
    ("I", "Ich", 0),
    ("You", "Du", 1),
    ("He", "Er", 2),
    ("She", "Sie", 2),
    ("We", "Wir", 3),
    ("They", "Sie", 3),
)
_THIRD_PERSON_SINGULAR = 2

_DEFINITE_NOMINATIVE = {"m": "Der", "f": "Die", "n": "Das"}
_INDEFINITE_ACCUSATIVE = {"m": "einen", "f": "eine", "n": "ein"}
# Adjective ending after the indefinite article in the accusative.
_MIXED_ACCUSATIVE_ENDING = {"m": "en", "f": "e", "n": "es"}
_STRONG_PLURAL_ENDING = "e"  # "drei rote Autos"
_WEAK_PLURAL_ENDING = "en"  # "die drei roten Autos"

# --------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------

# ((low, high), weight): ranges of numbers and how often each is drawn.
_Bands = tuple[tuple[tuple[int, int], int], ...]

_BARE_NUMBER_BANDS: _Bands = (
    ((0, 99), 25),
    ((100, 999), 45),
    ((1_000, 9_999), 10),
    ((10_000, 99_999), 10),
    ((100_000, 999_999), 10),
)
_COUNT_BANDS: _Bands = (
    ((2, 20), 35),
    ((21, 99), 35),
    ((100, 999), 20),
    ((1_000, 99_999), 7),
    ((100_000, 999_999), 3),
)
_SINGULAR_SHARE = 0.1  # share of noun phrases with "one"
_ADJECTIVE_SHARE = 0.5  # share of noun phrases with an adjective


def _sample_from_bands(rng: random.Random, bands: _Bands) -> int:
    """Pick a band by weight, then a number uniformly inside it."""
    ranges = [band for band, _ in bands]
    low, high = rng.choices(ranges, weights=[weight for _, weight in bands])[0]
    return rng.randint(low, high)


def _sample_plural_count(rng: random.Random) -> int:
    """A count of at least 2 that reads naturally before a plural noun.

    Numbers like 101 or 2001 are redrawn: German has no single settled form
    for them before a noun ("hundertein Äpfel" vs "hundertundein Apfel").
    """
    while True:
        count = _sample_from_bands(rng, _COUNT_BANDS)
        if count % 100 != 1:
            return count


def _maybe_adjective(rng: random.Random) -> tuple[str, str] | None:
    """An (English, German stem) adjective for half of the noun phrases."""
    return rng.choice(_ADJECTIVES) if rng.random() < _ADJECTIVE_SHARE else None


def _accusative_noun_phrase(rng: random.Random) -> tuple[str, str]:
    """An indefinite noun phrase with a count, e.g. "three red cars"."""
    noun = rng.choice(_NOUNS)
    adjective = _maybe_adjective(rng)
    if rng.random() < _SINGULAR_SHARE:
        en = ["one"]
        de = [_INDEFINITE_ACCUSATIVE[noun.gender]]
        if adjective:
            en.append(adjective[0])
            de.append(adjective[1] + _MIXED_ACCUSATIVE_ENDING[noun.gender])
        en.append(noun.en)
        de.append(noun.de)
    else:
        count = _sample_plural_count(rng)
        en = [number_to_english(count)]
        de = [number_to_german(count)]
        if adjective:
            en.append(adjective[0])
            de.append(adjective[1] + _STRONG_PLURAL_ENDING)
        en.append(noun.en_plural)
        de.append(noun.de_plural)
    return " ".join(en), " ".join(de)


# --------------------------------------------------------------------------
# Templates: each returns one (english, german) pair
# --------------------------------------------------------------------------


def _bare_number(rng: random.Random) -> tuple[str, str]:
    """A bare number: "three hundred forty-five" -> "dreihundertfünfundvierzig"."""
    n = _sample_from_bands(rng, _BARE_NUMBER_BANDS)
    return number_to_english(n), number_to_german(n)


def _subject_verb_object(rng: random.Random) -> tuple[str, str]:
    """Subject, verb, object: "I have twenty-one apples." -> "Ich habe einundzwanzig Äpfel."."""
    subject_en, subject_de, person = rng.choice(_SUBJECTS)
    verb = rng.choice(_VERBS)
    object_en, object_de = _accusative_noun_phrase(rng)
    verb_en = verb.en_3sg if person == _THIRD_PERSON_SINGULAR else verb.en
    return (
        f"{subject_en} {verb_en} {object_en}.",
        f"{subject_de} {verb.de[person]} {object_de}.",
    )


def _there_is(rng: random.Random) -> tuple[str, str]:
    """Existence: "There is one dog." -> "Es gibt einen Hund."."""
    object_en, object_de = _accusative_noun_phrase(rng)
    verb_en = "is" if object_en.startswith("one ") else "are"
    return f"There {verb_en} {object_en}.", f"Es gibt {object_de}."


def _definite_plural_fragment(rng: random.Random) -> tuple[str, str]:
    """A definite plural fragment: "the three red cars" -> "die drei roten Autos"."""
    noun = rng.choice(_NOUNS)
    count = _sample_plural_count(rng)
    adjective = _maybe_adjective(rng)
    en = ["the", number_to_english(count)]
    de = ["die", number_to_german(count)]
    if adjective:
        en.append(adjective[0])
        de.append(adjective[1] + _WEAK_PLURAL_ENDING)
    en.append(noun.en_plural)
    de.append(noun.de_plural)
    return " ".join(en), " ".join(de)


def _predicative_adjective(rng: random.Random) -> tuple[str, str]:
    """A predicative adjective, singular or plural with a count.

    "The dog is red." -> "Der Hund ist rot."
    "The twelve cups are new." -> "Die zwölf Tassen sind neu."
    """
    noun = rng.choice(_NOUNS)
    adjective_en, adjective_de = rng.choice(_ADJECTIVES)
    if rng.random() < 0.5:
        return (
            f"The {noun.en} is {adjective_en}.",
            f"{_DEFINITE_NOMINATIVE[noun.gender]} {noun.de} ist {adjective_de}.",
        )
    count = _sample_plural_count(rng)
    return (
        f"The {number_to_english(count)} {noun.en_plural} are {adjective_en}.",
        f"Die {number_to_german(count)} {noun.de_plural} sind {adjective_de}.",
    )


def _addition(rng: random.Random) -> tuple[str, str]:
    """Addition: "three plus four is seven" -> "drei plus vier ist sieben"."""
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return (
        f"{number_to_english(a)} plus {number_to_english(b)} is {number_to_english(a + b)}",
        f"{number_to_german(a)} plus {number_to_german(b)} ist {number_to_german(a + b)}",
    )


# (template, weight): bare numbers are 40% of pairs, phrases 60%.
_TEMPLATES: tuple[tuple[Callable[[random.Random], tuple[str, str]], int], ...] = (
    (_bare_number, 40),
    (_subject_verb_object, 25),
    (_there_is, 10),
    (_definite_plural_fragment, 10),
    (_predicative_adjective, 8),
    (_addition, 7),
)


def _sample_pair(rng: random.Random) -> tuple[str, str]:
    """One pair from a template chosen by weight."""
    templates = [template for template, _ in _TEMPLATES]
    template = rng.choices(templates, weights=[weight for _, weight in _TEMPLATES])[0]
    return template(rng)


# --------------------------------------------------------------------------
# Public corpus API
# --------------------------------------------------------------------------


def generate_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """n (english, german) pairs, deterministic for a given seed.

    Pairs are drawn independently, so frequent short items (small numbers)
    may repeat.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    rng = random.Random(seed)
    return [_sample_pair(rng) for _ in range(n)]


def builtin_splits(n_train: int, n_valid: int, n_test: int, seed: int) -> dict[str, list[tuple[str, str]]]:
    """{'train': [...], 'valid': [...], 'test': [...]} with NO source sentence shared between splits.

    'train' equals ``generate_pairs(n_train, seed)``. 'valid' and 'test' are
    then drawn from the same generator, keeping only English sentences not
    seen in any earlier split (nor earlier in their own split), so they
    measure translation of unseen inputs. Because small numbers are usually
    already in 'train', the held-out splits lean towards longer items, and
    they depend on n_train as well as on the seed.
    """
    for name, size in (("n_train", n_train), ("n_valid", n_valid), ("n_test", n_test)):
        if size < 0:
            raise ValueError(f"{name} must be non-negative, got {size}")
    rng = random.Random(seed)
    train = [_sample_pair(rng) for _ in range(n_train)]
    seen = {source for source, _ in train}
    max_draws = 1_000 + 100 * (n_valid + n_test)
    draws = 0
    held_out: dict[str, list[tuple[str, str]]] = {}
    for name, size in (("valid", n_valid), ("test", n_test)):
        split: list[tuple[str, str]] = []
        while len(split) < size:
            draws += 1
            if draws > max_draws:
                raise RuntimeError("could not draw enough unseen sentences for valid/test")
            pair = _sample_pair(rng)
            if pair[0] not in seen:
                seen.add(pair[0])
                split.append(pair)
        held_out[name] = split
    return {"train": train, **held_out}
