"""Rebuild ``veil_pii/data/{given,family}_names.txt.gz`` from Faker's locales.

The lists are the given and family names of every locale of Faker
(https://github.com/joke2k/faker, MIT licence, notice in
``veil_pii/data/LICENSE-faker.txt``): common real names of many countries, a
gazetteer for the name recognizer. Faker is needed only to rebuild them::

    pip install faker && python tools/build_name_lists.py
"""

from __future__ import annotations

import gzip
import importlib
import pkgutil
import re
from pathlib import Path

import faker.providers.person as person

NAME = re.compile(r"[^\W\d_]+(?:[-' ][^\W\d_]+)*")
OUT = Path(__file__).resolve().parent.parent / "veil_pii" / "data"


def collect() -> tuple[set[str], set[str]]:
    """Every locale's ``first_names*`` and ``last_names*`` entries."""
    given: set[str] = set()
    family: set[str] = set()
    for module in pkgutil.iter_modules(person.__path__):
        provider = getattr(
            importlib.import_module(f"{person.__name__}.{module.name}"), "Provider", None
        )
        for attr in dir(provider) if provider else ():
            names = getattr(provider, attr)
            if not isinstance(names, (tuple, list, dict, set)):
                continue
            names = list(names)
            if not all(isinstance(n, str) for n in names):
                continue
            if attr.startswith("first_names"):
                given.update(n for n in names if NAME.fullmatch(n))
            elif attr.startswith("last_names"):
                family.update(n for n in names if NAME.fullmatch(n))
    return given, family


def main() -> None:
    given, family = collect()
    for name, values in (("given_names", given), ("family_names", family)):
        data = "\n".join(sorted(values)).encode()
        (OUT / f"{name}.txt.gz").write_bytes(gzip.compress(data, mtime=0))
        print(f"{name}: {len(values)} names")


if __name__ == "__main__":
    main()
