"""TFDS builder `numbers`: English sentences with numbers -> translations with numbers in words.

A translation / text-normalisation corpus generated offline. Each example is an
English sentence whose numbers are digits (cardinals, ordinals, years, dates,
money amounts, percentages) and its translation with every number written out
in words by ``num2words``::

    source: "The museum opened on 3 March 1999."
    target: "Das Museum wurde am dritten März neunzehnhundertneunundneunzig eröffnet."

Configs ``en-de`` (default), ``en-fr`` and ``en-es`` share the same English
sentences (one seeded random stream), so the three are multi-way parallel. The
sentence frames are hand-written here in four languages (code, not data); the
numbers, names and cities are drawn from a fixed-seed ``random.Random``.
Grammar the frames rely on: counted nouns are masculine in French and Spanish
and counts never end in 1 (so no un/une, uno/un agreement is needed), ordinals
only appear before masculine nouns in oblique case (German ``-n`` ending,
Spanish apocope ``tercer``), and money stays below a million.

Duplicate English sentences are dropped (their number is kept in the dataset
metadata as ``skipped``); the rest go to ``train`` / ``validation`` / ``test``
(90/5/5 %) by a stable hash of the English sentence, so no source sentence is
in two splits and the splits agree across configs.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import string
from decimal import Decimal

import tensorflow_datasets as tfds
from etils import epath
from num2words import num2words

from jaxllm.data.pydocs import SPLITS, stable_split

LANGS = ("de", "fr", "es")
CONFIGS = tuple(f"en-{lang}" for lang in LANGS)
NUM_CANDIDATES = 12_000  # sentences drawn before de-duplication
_SEED = 20240601

# (English, German, French, Spanish). Slots: name, city, his (possessive), n/n2 (count),
# k (large count), c (identifier number), y (year), d (date with its preposition),
# o (ordinal before a masculine noun), m (money), p (percentage), a (age).
_FRAMES = (
    (
        "{name} bought {n} books for {m}.",
        "{name} kaufte {n} Bücher für {m}.",
        "{name} a acheté {n} livres pour {m}.",
        "{name} compró {n} libros por {m}.",
    ),
    (
        "The train to {city} leaves from platform {c}.",
        "Der Zug nach {city} fährt von Gleis {c} ab.",
        "Le train pour {city} part du quai {c}.",
        "El tren a {city} sale del andén {c}.",
    ),
    (
        "The museum opened {d}.",
        "Das Museum wurde {d} eröffnet.",
        "Le musée a ouvert ses portes {d}.",
        "El museo abrió sus puertas {d}.",
    ),
    (
        "The bridge in {city} was built in {y}.",
        "Die Brücke in {city} wurde {y} gebaut.",
        "Le pont de {city} a été construit en {y}.",
        "El puente de {city} fue construido en {y}.",
    ),
    (
        "{city} has {k} inhabitants.",
        "{city} hat {k} Einwohner.",
        "{city} compte {k} habitants.",
        "{city} tiene {k} habitantes.",
    ),
    (
        "Our office in {city} is on the {o} floor.",
        "Unser Büro in {city} ist im {o} Stock.",
        "Notre bureau à {city} est au {o} étage.",
        "Nuestra oficina en {city} está en el {o} piso.",
    ),
    (
        "{name} celebrated {his} {o} birthday in {city}.",
        "{name} feierte {his} {o} Geburtstag in {city}.",
        "{name} a fêté {his} {o} anniversaire à {city}.",
        "{name} celebró {his} {o} cumpleaños en {city}.",
    ),
    (
        "The ticket to {city} costs {m}.",
        "Die Fahrkarte nach {city} kostet {m}.",
        "Le billet pour {city} coûte {m}.",
        "El billete a {city} cuesta {m}.",
    ),
    (
        "Prices in {city} rose by {p} in {y}.",
        "Die Preise in {city} stiegen {y} um {p}.",
        "Les prix à {city} ont augmenté de {p} en {y}.",
        "Los precios en {city} subieron un {p} en {y}.",
    ),
    (
        "The meeting with {name} is {d}.",
        "Die Besprechung mit {name} ist {d}.",
        "La réunion avec {name} a lieu {d}.",
        "La reunión con {name} es {d}.",
    ),
    (
        "{name} ran {n} kilometres in {n2} minutes.",
        "{name} lief {n} Kilometer in {n2} Minuten.",
        "{name} a couru {n} kilomètres en {n2} minutes.",
        "{name} corrió {n} kilómetros en {n2} minutos.",
    ),
    (
        "The recipe needs {n} grams of flour and {n2} grams of sugar.",
        "Das Rezept braucht {n} Gramm Mehl und {n2} Gramm Zucker.",
        "La recette demande {n} grammes de farine et {n2} grammes de sucre.",
        "La receta necesita {n} gramos de harina y {n2} gramos de azúcar.",
    ),
    (
        "{name} moved to {city} in {y}.",
        "{name} zog {y} nach {city}.",
        "{name} a déménagé à {city} en {y}.",
        "{name} se mudó a {city} en {y}.",
    ),
    (
        "A hotel room in {city} costs {m} per night.",
        "Ein Hotelzimmer in {city} kostet {m} pro Nacht.",
        "Une chambre d'hôtel à {city} coûte {m} par nuit.",
        "Una habitación de hotel en {city} cuesta {m} por noche.",
    ),
    (
        "{name} scored {n} points in the final.",
        "{name} erzielte {n} Punkte im Finale.",
        "{name} a marqué {n} points en finale.",
        "{name} anotó {n} puntos en la final.",
    ),
    (
        "The company was founded in {city} {d}.",
        "Die Firma wurde {d} in {city} gegründet.",
        "L'entreprise a été fondée à {city} {d}.",
        "La empresa fue fundada en {city} {d}.",
    ),
    (
        "{name} paid {m} for {n} tickets.",
        "{name} bezahlte {m} für {n} Eintrittskarten.",
        "{name} a payé {m} pour {n} billets.",
        "{name} pagó {m} por {n} boletos.",
    ),
    (
        "Flight {c} to {city} is delayed by {n} minutes.",
        "Flug {c} nach {city} hat {n} Minuten Verspätung.",
        "Le vol {c} pour {city} a {n} minutes de retard.",
        "El vuelo {c} a {city} lleva {n} minutos de retraso.",
    ),
    (
        "Unemployment in {city} fell to {p} in {y}.",
        "Die Arbeitslosigkeit in {city} sank {y} auf {p}.",
        "Le chômage à {city} est tombé à {p} en {y}.",
        "El desempleo en {city} bajó al {p} en {y}.",
    ),
    (
        "The library in {city} owns {k} books.",
        "Die Bibliothek in {city} besitzt {k} Bücher.",
        "La bibliothèque de {city} possède {k} livres.",
        "La biblioteca de {city} tiene {k} libros.",
    ),
    (
        "{name} is {a} years old.",
        "{name} ist {a} Jahre alt.",
        "{name} a {a} ans.",
        "{name} tiene {a} años.",
    ),
    (
        "{name} has lived in {city} since {y}.",
        "{name} wohnt seit {y} in {city}.",
        "{name} habite à {city} depuis {y}.",
        "{name} vive en {city} desde {y}.",
    ),
    (
        "The deadline for {name} is {d}.",
        "Die Frist für {name} endet {d}.",
        "La date limite pour {name} est {d}.",
        "La fecha límite para {name} es {d}.",
    ),
    (
        "The shop in {city} sold {n} umbrellas for {m} each.",
        "Der Laden in {city} verkaufte {n} Regenschirme für je {m}.",
        "Le magasin de {city} a vendu {n} parapluies à {m} chacun.",
        "La tienda de {city} vendió {n} paraguas a {m} cada uno.",
    ),
    (
        "Page {c} of the report says that {p} of the students passed.",
        "Auf Seite {c} des Berichts steht, dass {p} der Studenten bestanden haben.",
        "La page {c} du rapport indique que {p} des étudiants ont réussi.",
        "La página {c} del informe dice que el {p} de los estudiantes aprobó.",
    ),
)

_NAMES = (
    ("Anna", "f"), ("Tom", "m"), ("Maria", "f"), ("Lukas", "m"), ("Sofia", "f"),
    ("David", "m"), ("Emma", "f"), ("Paul", "m"), ("Laura", "f"), ("Felix", "m"),
    ("Julia", "f"), ("Martin", "m"), ("Clara", "f"), ("Daniel", "m"), ("Elena", "f"),
    ("Jonas", "m"), ("Nina", "f"), ("Oscar", "m"), ("Lea", "f"), ("Hugo", "m"),
    ("Ines", "f"), ("Marco", "m"), ("Sara", "f"), ("Victor", "m"),
)  # fmt: skip
_POSSESSIVE = {"m": ("his", "seinen", "son", "su"), "f": ("her", "ihren", "son", "su")}
_CITIES = (
    ("Munich", "München", "Munich", "Múnich"), ("Vienna", "Wien", "Vienne", "Viena"),
    ("Rome", "Rom", "Rome", "Roma"), ("London", "London", "Londres", "Londres"),
    ("Paris", "Paris", "Paris", "París"), ("Berlin", "Berlin", "Berlin", "Berlín"),
    ("Madrid", "Madrid", "Madrid", "Madrid"), ("Lisbon", "Lissabon", "Lisbonne", "Lisboa"),
    ("Warsaw", "Warschau", "Varsovie", "Varsovia"), ("Prague", "Prag", "Prague", "Praga"),
    ("Zurich", "Zürich", "Zurich", "Zúrich"), ("Hamburg", "Hamburg", "Hambourg", "Hamburgo"),
    ("Athens", "Athen", "Athènes", "Atenas"), ("Brussels", "Brüssel", "Bruxelles", "Bruselas"),
    ("Seville", "Sevilla", "Séville", "Sevilla"), ("Dublin", "Dublin", "Dublin", "Dublín"),
    ("Copenhagen", "Kopenhagen", "Copenhague", "Copenhague"), ("Oslo", "Oslo", "Oslo", "Oslo"),
)  # fmt: skip


def frame_slots(frame: str) -> frozenset[str]:
    """The slot names a frame uses (the same in all four languages; a test checks it)."""
    return frozenset(name for _, name, _, _ in string.Formatter().parse(frame) if name)


_SLOTS = [frame_slots(frame[0]) for frame in _FRAMES]
_MONTHS = {
    "en": "January February March April May June July August September October November December",
    "de": "Januar Februar März April Mai Juni Juli August September Oktober November Dezember",
    "fr": "janvier février mars avril mai juin juillet août septembre octobre novembre décembre",
    "es": "enero febrero marzo abril mayo junio julio agosto septiembre octubre noviembre "
    "diciembre",
}
_MONTHS = {lang: names.split() for lang, names in _MONTHS.items()}
_CURRENCIES = {"€": "EUR", "$": "USD"}
_PERCENT = {"de": "Prozent", "fr": "pour cent", "es": "por ciento"}
# num2words writes whole amounts as "... Euro und null Cent"; the cents clause goes.
_ZERO_CENTS = re.compile(r",? (und|et|con|y) (null|zéro|cero) \S+$")


def _es(words: str) -> str:
    # Spanish apocope inside compounds that num2words misses: "veintiuno mil" -> "veintiún mil".
    words = re.sub(r"veintiuno(?= mil| millones)", "veintiún", words)
    return re.sub(r"\buno(?= mil| millones)", "un", words)


def _cardinal(value: int | Decimal, lang: str) -> str:
    words = num2words(value, lang=lang)
    return _es(words) if lang == "es" else words


def _ordinal(value: int, lang: str) -> str:
    """Ordinal before a masculine noun in oblique case: dritten / troisième / tercer."""
    words = num2words(value, lang=lang, to="ordinal")
    if lang == "de":
        return words + "n"  # dative/accusative masculine: im dritten Stock, seinen dritten
    if lang == "es":
        return re.sub(r"(primer|tercer)o$", r"\1", words)  # apocope before a masculine noun
    return words


def _year(year: int, lang: str) -> str:
    words = num2words(year, lang=lang, to="year")
    return _es(words) if lang == "es" else words


def _date(day: int, month: int, year: int, lang: str) -> str:
    name = _MONTHS[lang][month - 1]
    y = _year(year, lang)
    if lang == "de":
        return f"am {_ordinal(day, 'de')} {name} {y}"
    if lang == "fr":
        d = "premier" if day == 1 else num2words(day, lang="fr")
        return f"le {d} {name} {y}"
    d = "primero" if day == 1 else num2words(day, lang="es")
    return f"el {d} de {name} de {y}"


def _money(amount: Decimal, symbol: str, lang: str) -> str:
    words = num2words(amount, lang=lang, to="currency", currency=_CURRENCIES[symbol])
    return _ZERO_CENTS.sub("", words)


def _count(rng: random.Random, low: int, high: int) -> int:
    """Log-uniform count in [low, high] that does not end in 1 (see module docstring)."""
    while True:
        value = int(round(10 ** rng.uniform(len(str(low)) - 1, len(str(high)))))
        if low <= value <= high and value % 10 != 1:
            return value


def _draw(rng: random.Random) -> tuple[int, dict]:
    """Draws a frame index and the raw values of its slots (consumes `rng` identically always)."""
    index = rng.randrange(len(_FRAMES))
    cents = rng.random() < 0.5
    amount = Decimal(_count(rng, 2, 99_999))
    if cents:
        amount += Decimal(rng.randrange(1, 100)) / 100
    pct = Decimal(rng.randrange(2, 100))
    if rng.random() < 0.25:
        pct += Decimal(rng.randrange(1, 10)) / 10
    values = {
        "name": rng.choice(_NAMES),
        "city": rng.choice(_CITIES),
        "n": _count(rng, 2, 999),
        "n2": _count(rng, 2, 999),
        "k": _count(rng, 1_000, 9_999_999),
        "c": rng.randrange(1, 500),
        "y": rng.randrange(1700, 2031),
        "d": (rng.randrange(1, 29), rng.randrange(1, 13), rng.randrange(1800, 2031)),
        "date_style": rng.randrange(2),
        "o": rng.randrange(1, 41),
        "m": (amount.quantize(Decimal("0.01")), rng.choice(tuple(_CURRENCIES))),
        "p": pct,
        "a": _count(rng, 2, 99),
    }
    return index, values


def _english(values: dict) -> dict[str, str]:
    day, month, year = values["d"]
    month_name = _MONTHS["en"][month - 1]
    amount, symbol = values["m"]
    suffix = {1: "st", 2: "nd", 3: "rd"}
    o = values["o"]
    ord_suffix = "th" if 10 <= o % 100 <= 20 else suffix.get(o % 10, "th")
    money = f"{amount:,.2f}" if amount % 1 else f"{int(amount):,}"
    date = f"{day} {month_name} {year}" if values["date_style"] else f"{month_name} {day}, {year}"
    return {
        "name": values["name"][0],
        "city": values["city"][0],
        "his": _POSSESSIVE[values["name"][1]][0],
        "n": f"{values['n']:,}",
        "n2": f"{values['n2']:,}",
        "k": f"{values['k']:,}",
        "c": str(values["c"]),
        "y": str(values["y"]),
        "d": f"on {date}",
        "o": f"{o}{ord_suffix}",
        "m": f"{symbol}{money}",
        "p": f"{values['p']}%",
        "a": str(values["a"]),
    }


def _foreign(values: dict, lang: str, slots: frozenset[str]) -> dict[str, str]:
    """Slot texts in `lang`; only `slots` are rendered (num2words is ~0.1 ms a call)."""
    col = 1 + LANGS.index(lang)
    amount, symbol = values["m"]
    pct = values["p"]
    render = {
        "name": lambda: values["name"][0],
        "city": lambda: values["city"][col],
        "his": lambda: _POSSESSIVE[values["name"][1]][col],
        "n": lambda: _cardinal(values["n"], lang),
        "n2": lambda: _cardinal(values["n2"], lang),
        "k": lambda: _cardinal(values["k"], lang),
        "c": lambda: _cardinal(values["c"], lang),
        "y": lambda: _year(values["y"], lang),
        "d": lambda: _date(*values["d"], lang),
        "o": lambda: _ordinal(values["o"], lang),
        "m": lambda: _money(amount, symbol, lang),
        "p": lambda: f"{_cardinal(int(pct) if pct % 1 == 0 else pct, lang)} {_PERCENT[lang]}",
        "a": lambda: _cardinal(values["a"], lang),
    }
    return {slot: render[slot]() for slot in slots}


def _capitalise(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]


def generate_pairs(lang: str, num: int = NUM_CANDIDATES) -> tuple[list[tuple[str, str]], int]:
    """All (English, translation) pairs of one config, de-duplicated by English sentence.

    Args:
      lang: ``de``, ``fr`` or ``es``.
      num: Sentences to draw before de-duplication.

    Returns:
      ``(pairs, duplicates)``: pairs in draw order, and how many drawn sentences
      repeated an earlier English sentence and were dropped.
    """
    rng = random.Random(_SEED)
    col = 1 + LANGS.index(lang)
    seen, pairs = set(), []
    for _ in range(num):
        index, values = _draw(rng)
        source = _capitalise(_FRAMES[index][0].format(**_english(values)))
        if source in seen:
            continue
        seen.add(source)
        slots = _SLOTS[index]
        target = _FRAMES[index][col].format(**_foreign(values, lang, slots))
        pairs.append((source, _capitalise(target)))
    return pairs, num - len(pairs)


class Numbers(tfds.core.GeneratorBasedBuilder):
    """English sentences with numbers and their translations with numbers in words."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "25 frames, 12k draws, de-duplicated, 90/5/5 hash split."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name=name, description=f"English -> {name[3:]} with num2words.")
        for name in CONFIGS
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "en-de"

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # As in pydocs: TFDS would need `importlib_resources` to find the package.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "source": tfds.features.Text(),
                    "target": tfds.features.Text(),
                }
            ),
            supervised_keys=("source", "target"),
            metadata=tfds.core.MetadataDict(),
            homepage="https://github.com/savoirfairelinux/num2words",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded
        pairs, duplicates = generate_pairs(self.builder_config.name[3:])
        # Kept in the prepared dataset so readers can report what was dropped.
        self.info.metadata["skipped"] = {"duplicate_source": duplicates}
        if duplicates:
            logging.warning(
                "numbers/%s: dropped %d repeated English sentences of %d drawn",
                self.builder_config.name,
                duplicates,
                NUM_CANDIDATES,
            )
        return {split: self._generate_examples(pairs, split) for split in SPLITS}

    def _generate_examples(self, pairs, split):
        for source, target in pairs:
            # The key is the English sentence: it decides the split, so no source is in two.
            if stable_split(source) == split:
                key = hashlib.sha256(source.encode()).hexdigest()[:16]
                yield key, {"id": key, "source": source, "target": target}
