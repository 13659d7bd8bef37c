"""Non-English prompts from the Debian Administrator's Handbook (Debian package `debian-handbook`).

The package installs the book as HTML in ~20 languages under /usr/share/doc/debian-handbook/html/<lang>/;
its body paragraphs are `<div class="para">`. Some paragraphs were never translated and stay in English,
so each paragraph must read as the target language by a stopword count before it becomes a prompt. The
prompts ask to continue, translate or summarise a paragraph: the answer is mostly in that language, which
is the drift an English-trained draft handles worst (TIDE: static drafts fall to 0.70-0.86x of no-spec).
"""

import random
import re
from html.parser import HTMLParser
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from tide_sglang.workloads.prompt import Prompt, seeded_sample, system_dir

HANDBOOK_ROOT = Path("/usr/share/doc/debian-handbook/html")
HANDBOOK_PACKAGE = "debian-handbook"
HANDBOOK_INSTALL = "apt-get install -y --no-install-recommends debian-handbook"
MIN_CHARS, MAX_CHARS = 200, 1_200  # a paragraph with a point to continue; short enough for a CPU prefill


def _wordset(words: str) -> frozenset[str]:
    return frozenset(words.split())


_ENGLISH = _wordset("the and of to is in that for with this are be you it on")


class Language(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    domain: str
    directory: str  # under HANDBOOK_ROOT
    stopwords: frozenset[str]  # frequent short words: a paragraph must have more of these than English ones
    templates: tuple[str, ...]  # instructions; "{text}" is the paragraph


LANGUAGES = {
    "french": Language(
        domain="french",
        directory="fr-FR",
        stopwords=_wordset("le la les des est et une un du pour dans que qui sur pas par avec ce il"),
        templates=(
            "Continue ce texte :\n\n{text}",
            "Traduis en anglais :\n\n{text}",
            "Résume ce paragraphe en une phrase, en français :\n\n{text}",
            "Explique ce passage à un débutant, en français :\n\n{text}",
        ),
    ),
    "german": Language(
        domain="german",
        directory="de-DE",
        stopwords=_wordset("der die das und ist nicht mit den ein eine zu von auf für sich im dem"),
        templates=(
            "Setze diesen Text fort:\n\n{text}",
            "Übersetze ins Englische:\n\n{text}",
            "Fasse diesen Absatz in einem Satz auf Deutsch zusammen:\n\n{text}",
            "Erkläre diesen Abschnitt einem Anfänger, auf Deutsch:\n\n{text}",
        ),
    ),
}


class _ParaParser(HTMLParser):
    """Collects the text of each outermost `<div class="para">` (paragraphs may nest divs and code)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._depth = 0  # div depth inside the current paragraph; 0 = outside any paragraph
        self._parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag != "div":
            return
        if self._depth:
            self._depth += 1
        elif "para" in (dict(attrs).get("class") or "").split():
            self._depth, self._parts = 1, []

    def handle_endtag(self, tag: str) -> None:
        if tag == "div" and self._depth:
            self._depth -= 1
            if not self._depth:
                self.paragraphs.append(" ".join("".join(self._parts).split()))

    def handle_data(self, data: str) -> None:
        if self._depth:
            self._parts.append(data)


def paragraphs(html: str) -> list[str]:
    parser = _ParaParser()
    parser.feed(html)
    parser.close()
    return parser.paragraphs


def reads_as(text: str, language: Language) -> bool:
    words = re.findall(r"[^\W\d_]+", text.lower())
    native = sum(word in language.stopwords for word in words)
    english = sum(word in _ENGLISH for word in words)
    return native >= 5 and native > 2 * english


def load_handbook(language: str, limit: int = 64, seed: int = 0, *, root: Path = HANDBOOK_ROOT) -> list[Prompt]:
    """Handbook paragraphs in `language` ("french" or "german") wrapped in a seeded instruction."""
    if language not in LANGUAGES:
        raise ValueError(f"unknown language {language!r}; known: {', '.join(LANGUAGES)}")
    lang = LANGUAGES[language]
    directory = system_dir(root / lang.directory, HANDBOOK_PACKAGE, HANDBOOK_INSTALL)
    texts: list[tuple[str, str]] = []  # (id, paragraph), in file order so ids are stable
    for page in sorted(directory.glob("*.html")):
        for index, text in enumerate(paragraphs(page.read_text(encoding="utf-8"))):
            if MIN_CHARS <= len(text) <= MAX_CHARS and reads_as(text, lang):
                texts.append((f"handbook:{lang.directory}:{page.stem}:{index}", text))
    rng = random.Random(seed)  # the template for each paragraph is part of what the seed fixes
    prompts = [
        Prompt(domain=lang.domain, text=rng.choice(lang.templates).format(text=text), id=prompt_id)
        for prompt_id, text in texts
    ]
    return seeded_sample(prompts, limit, seed)


def load_french(limit: int = 64, seed: int = 0) -> list[Prompt]:
    return load_handbook("french", limit, seed)


def load_german(limit: int = 64, seed: int = 0) -> list[Prompt]:
    return load_handbook("german", limit, seed)
