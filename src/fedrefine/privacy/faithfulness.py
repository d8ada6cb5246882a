"""Whether a rephrasing is faithful to its query: a rephraser must not invent names.

A small rephraser copies an unseen name imperfectly ("Babrai" becomes "Bapai"); the sender then
answers about nobody. The ``names`` check catches this without knowing what the query is about:
every name the rephrasing writes, i.e. a capitalised word that does not open a sentence, must occur
in the query (case aside). It does not ask the rephrasing to keep every name of the query: a private
preamble's names are meant to be left out.
"""

from __future__ import annotations

import re
from typing import Literal

#: ``off``: every rephrasing is accepted; ``names``: see :func:`invented_names`.
FaithfulnessCheck = Literal["off", "names"]
FAITHFULNESS_CHECKS: tuple[str, ...] = ("off", "names")

_WORD = re.compile(r"\w+")
_SENTENCE_END = re.compile(r"(^|[.!?:;\n])\W*$")


def names_in(text: str) -> list[str]:
    """Capitalised words of ``text`` that do not open a sentence (nor are the pronoun "I")."""
    names = []
    for match in _WORD.finditer(text):
        word = match.group()
        if word[0].isupper() and word != "I" and not _SENTENCE_END.search(text[: match.start()]):
            names.append(word)
    return names


def invented_names(query: str, rephrasing: str) -> list[str]:
    """Names in ``rephrasing`` (see :func:`names_in`) that occur nowhere in ``query``, case aside."""
    known = {word.lower() for word in _WORD.findall(query)}
    return [name for name in names_in(rephrasing) if name.lower() not in known]


def is_faithful(check: FaithfulnessCheck, query: str, rephrasing: str) -> bool:
    """Whether ``rephrasing`` passes ``check`` for ``query``; an empty (or blank) rephrasing never does: the sender
    would read nothing of the question."""
    if not rephrasing.strip():
        return False
    if check == "off":
        return True
    if check == "names":
        return not invented_names(query, rephrasing)
    raise ValueError(f"Unknown faithfulness check {check!r}; choose from {FAITHFULNESS_CHECKS}.")
