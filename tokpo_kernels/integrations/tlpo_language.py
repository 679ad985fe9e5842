"""Script-based language-confusion checker for TLPO (docs/methods.md §4, step 1).

TLPO detects *language confusion* with a rule, not a model: walk the characters of a response and
report the first **letter** whose Unicode script is not one of the target language's scripts.
Punctuation, digits, symbols, emoji, whitespace and combining marks are never letters here, and
ASCII letters are ignored by default (code, URLs, units and Latin acronyms are common and legitimate
inside e.g. Korean or Chinese answers) — unless the target itself is written in Latin script.

Pure Python (``unicodedata`` + a code-point range table): no tokenizer and no tensors. The two
helpers at the bottom map the confusion character offset to a token index with a tokenizer's offsets
(``return_offsets_mapping=True`` of a fast tokenizer, or :func:`decoded_token_offsets` for generated
ids) and give the update position ``u = c − 1``.

Example::

    >>> first_confusion("안녕하세요, 저는 привет 입니다", "ko")
    10
    >>> first_confusion("안녕하세요! 123 😀 OK", "ko")       # digits/emoji/ASCII ignored
    >>> first_confusion("안녕하세요 OK", "ko", ignore_ascii=False)
    6
"""

from __future__ import annotations

import bisect
import unicodedata
import warnings
from typing import Iterable, List, Optional, Sequence, Tuple, Union

from tokpo_kernels.integrations._hf_utils import common_prefix_len

__all__ = [
    "LanguageChecker",
    "SCRIPTS",
    "char_script",
    "confusion_token_index",
    "decoded_token_offsets",
    "first_confusion",
    "target_scripts",
    "update_position",
]

# (first code point, last code point, script). Blocks of the scripts TLPO targets plus the common
# neighbours a confused model emits; anything else falls back to the Unicode character name.
_RANGES: Tuple[Tuple[int, int, str], ...] = (
    (0x0041, 0x005A, "Latin"), (0x0061, 0x007A, "Latin"), (0x00AA, 0x00AA, "Latin"),
    (0x00BA, 0x00BA, "Latin"), (0x00C0, 0x024F, "Latin"), (0x0250, 0x02AF, "Latin"),
    (0x02B0, 0x02B8, "Latin"), (0x02E0, 0x02E4, "Latin"),
    (0x0370, 0x03FF, "Greek"), (0x0400, 0x052F, "Cyrillic"), (0x0530, 0x058F, "Armenian"),
    (0x0590, 0x05FF, "Hebrew"), (0x0600, 0x06FF, "Arabic"), (0x0700, 0x074F, "Syriac"),
    (0x0750, 0x077F, "Arabic"), (0x0780, 0x07BF, "Thaana"), (0x0870, 0x08FF, "Arabic"),
    (0x0900, 0x097F, "Devanagari"), (0x0980, 0x09FF, "Bengali"), (0x0A00, 0x0A7F, "Gurmukhi"),
    (0x0A80, 0x0AFF, "Gujarati"), (0x0B00, 0x0B7F, "Oriya"), (0x0B80, 0x0BFF, "Tamil"),
    (0x0C00, 0x0C7F, "Telugu"), (0x0C80, 0x0CFF, "Kannada"), (0x0D00, 0x0D7F, "Malayalam"),
    (0x0D80, 0x0DFF, "Sinhala"), (0x0E00, 0x0E7F, "Thai"), (0x0E80, 0x0EFF, "Lao"),
    (0x0F00, 0x0FFF, "Tibetan"), (0x1000, 0x109F, "Myanmar"), (0x10A0, 0x10FF, "Georgian"),
    (0x1100, 0x11FF, "Hangul"), (0x1200, 0x139F, "Ethiopic"), (0x13A0, 0x13FF, "Cherokee"),
    (0x1780, 0x17FF, "Khmer"), (0x1800, 0x18AF, "Mongolian"), (0x1C80, 0x1C8F, "Cyrillic"),
    (0x1C90, 0x1CBF, "Georgian"), (0x1D00, 0x1D7F, "Latin"), (0x1D80, 0x1DBF, "Latin"),
    (0x1E00, 0x1EFF, "Latin"), (0x1F00, 0x1FFF, "Greek"), (0x2C00, 0x2C5F, "Glagolitic"),
    (0x2C60, 0x2C7F, "Latin"), (0x2D00, 0x2D2F, "Georgian"), (0x2DE0, 0x2DFF, "Cyrillic"),
    (0x2E80, 0x2FDF, "Han"), (0x3005, 0x3005, "Han"), (0x3007, 0x3007, "Han"),
    (0x3021, 0x3029, "Han"), (0x3038, 0x303B, "Han"), (0x3041, 0x309F, "Hiragana"),
    (0x30A0, 0x30FF, "Katakana"), (0x3100, 0x312F, "Bopomofo"), (0x3130, 0x318F, "Hangul"),
    (0x31A0, 0x31BF, "Bopomofo"), (0x31F0, 0x31FF, "Katakana"), (0x3400, 0x4DBF, "Han"),
    (0x4E00, 0x9FFF, "Han"), (0xA640, 0xA69F, "Cyrillic"), (0xA720, 0xA7FF, "Latin"),
    (0xA8E0, 0xA8FF, "Devanagari"), (0xA960, 0xA97F, "Hangul"), (0xAB30, 0xAB6F, "Latin"),
    (0xAC00, 0xD7AF, "Hangul"), (0xD7B0, 0xD7FF, "Hangul"), (0xF900, 0xFAFF, "Han"),
    (0xFB00, 0xFB06, "Latin"), (0xFB1D, 0xFB4F, "Hebrew"), (0xFB50, 0xFDFF, "Arabic"),
    (0xFE70, 0xFEFF, "Arabic"), (0xFF21, 0xFF3A, "Latin"), (0xFF41, 0xFF5A, "Latin"),
    (0xFF66, 0xFF9F, "Katakana"), (0xFFA0, 0xFFDC, "Hangul"), (0x1B000, 0x1B0FF, "Hiragana"),
    (0x1B100, 0x1B16F, "Hiragana"), (0x20000, 0x323AF, "Han"),
)
_STARTS = [r[0] for r in _RANGES]

# Unicode-name prefixes for the fallback (characters outside the table).
_NAME_PREFIXES = (
    ("CJK", "Han"), ("HANGUL", "Hangul"), ("HIRAGANA", "Hiragana"), ("KATAKANA", "Katakana"),
    ("LATIN", "Latin"), ("GREEK", "Greek"), ("COPTIC", "Coptic"), ("CYRILLIC", "Cyrillic"),
    ("ARABIC", "Arabic"), ("HEBREW", "Hebrew"), ("DEVANAGARI", "Devanagari"), ("THAI", "Thai"),
)

#: Canonical script names accepted as targets (others returned by :func:`char_script` work too).
SCRIPTS = frozenset(r[2] for r in _RANGES)

# Language (ISO 639-1/-3 code or English name) -> scripts that count as "in language".
_LANGUAGES = {
    "Hangul": ("ko", "kor", "korean"),
    "Han": ("zh", "zho", "chi", "cmn", "yue", "chinese", "mandarin", "cantonese"),
    "Arabic": ("ar", "ara", "arabic", "fa", "fas", "per", "persian", "farsi", "ur", "urd", "urdu",
               "ps", "pus", "pashto", "ug", "uig", "uyghur"),
    "Cyrillic": ("ru", "rus", "russian", "uk", "ukr", "ukrainian", "be", "bel", "belarusian",
                 "bg", "bul", "bulgarian", "sr", "srp", "serbian", "mk", "mkd", "macedonian",
                 "kk", "kaz", "kazakh", "ky", "kir", "kyrgyz", "mn", "mon", "mongolian",
                 "tg", "tgk", "tajik"),
    "Devanagari": ("hi", "hin", "hindi", "mr", "mar", "marathi", "ne", "nep", "nepali",
                   "sa", "san", "sanskrit"),
    "Thai": ("th", "tha", "thai"),
    "Greek": ("el", "ell", "gre", "greek"),
    "Hebrew": ("he", "heb", "iw", "hebrew", "yi", "yid", "yiddish"),
    "Latin": ("en", "eng", "english", "fr", "fra", "fre", "french", "de", "deu", "ger", "german",
              "es", "spa", "spanish", "it", "ita", "italian", "pt", "por", "portuguese",
              "nl", "nld", "dut", "dutch", "sv", "swe", "swedish", "da", "dan", "danish",
              "no", "nor", "nb", "nn", "norwegian", "fi", "fin", "finnish", "pl", "pol", "polish",
              "cs", "ces", "cze", "czech", "sk", "slk", "slovak", "ro", "ron", "rum", "romanian",
              "hu", "hun", "hungarian", "tr", "tur", "turkish", "vi", "vie", "vietnamese",
              "id", "ind", "indonesian", "ms", "msa", "may", "malay", "tl", "tgl", "tagalog",
              "sw", "swa", "swahili", "ca", "cat", "catalan", "hr", "hrv", "croatian",
              "sl", "slv", "slovenian", "et", "est", "estonian", "lv", "lav", "latvian",
              "lt", "lit", "lithuanian", "az", "aze", "azerbaijani", "uz", "uzb", "uzbek",
              "eu", "eus", "baq", "basque", "ga", "gle", "irish", "is", "isl", "ice", "icelandic"),
    "Bengali": ("bn", "ben", "bengali", "bangla", "as", "asm", "assamese"),
    "Tamil": ("ta", "tam", "tamil"),
    "Telugu": ("te", "tel", "telugu"),
    "Kannada": ("kn", "kan", "kannada"),
    "Malayalam": ("ml", "mal", "malayalam"),
    "Gujarati": ("gu", "guj", "gujarati"),
    "Gurmukhi": ("pa", "pan", "punjabi"),
    "Georgian": ("ka", "kat", "geo", "georgian"),
    "Armenian": ("hy", "hye", "arm", "armenian"),
    "Khmer": ("km", "khm", "khmer"),
    "Lao": ("lo", "lao"),
    "Myanmar": ("my", "mya", "bur", "burmese"),
    "Ethiopic": ("am", "amh", "amharic", "ti", "tir", "tigrinya"),
    "Sinhala": ("si", "sin", "sinhala"),
}
_LANG_TO_SCRIPTS = {alias: frozenset({script}) for script, aliases in _LANGUAGES.items() for alias in aliases}
_JAPANESE = frozenset({"Han", "Hiragana", "Katakana"})
for _alias in ("ja", "jpn", "japanese", "jp"):
    _LANG_TO_SCRIPTS[_alias] = _JAPANESE
# Script names given in any case; "Japanese"/"kana" name the Japanese writing system.
_SCRIPT_NAMES = {s.lower(): frozenset({s}) for s in SCRIPTS | {"Coptic"}}
_SCRIPT_NAMES.update({"kana": frozenset({"Hiragana", "Katakana"}), "hanzi": frozenset({"Han"}),
                      "kanji": frozenset({"Han"}), "cjk": frozenset({"Han"}),
                      "hanja": frozenset({"Han"}), "hangeul": frozenset({"Hangul"})})

Target = Union[str, Iterable[str]]


def char_script(ch: str) -> Optional[str]:
    """Unicode script of ``ch`` if it is a letter, else ``None``.

    Letters are general categories ``L*`` (``Lu Ll Lt Lm Lo``). Digits, punctuation, symbols
    (emoji included), separators, and combining marks (``M*``: they belong to the letter they sit on,
    which is checked itself) return ``None``. Letters outside the range table get their script
    from the first word of their Unicode name (``"Other"`` when that fails).
    """
    if len(ch) != 1:
        raise ValueError(f"char_script: expected one character, got {ch!r}")
    if not unicodedata.category(ch).startswith("L"):
        return None
    cp = ord(ch)
    i = bisect.bisect_right(_STARTS, cp) - 1
    if i >= 0 and _RANGES[i][0] <= cp <= _RANGES[i][1]:
        return _RANGES[i][2]
    name = unicodedata.name(ch, "")
    for prefix, script in _NAME_PREFIXES:
        if name.startswith(prefix):
            return script
    return name.split(" ", 1)[0].capitalize() if name else "Other"


def target_scripts(target: Target) -> frozenset:
    """Scripts that count as "in language" for ``target``.

    ``target`` is an ISO 639 code (``"ko"``, ``"zh"``, ``"ja"``, ``"ar"``, ``"ru"``, ``"hi"``,
    ``"th"``, ``"el"``, ``"he"``, ``"en"``, …; region tags such as ``"zh-CN"``/``"pt_BR"`` are
    accepted), an English language name (``"Korean"``), a script name (``"Hangul"``, ``"Han"``,
    ``"Hiragana"``, ``"Katakana"``, ``"Arabic"``, ``"Cyrillic"``, ``"Devanagari"``, ``"Thai"``,
    ``"Greek"``, ``"Hebrew"``, ``"Latin"``, …, case-insensitive), or an iterable of script names
    (their union, e.g. ``{"Hangul", "Han"}`` to allow Hanja in Korean). Japanese (``"ja"``,
    ``"Japanese"``) is Han + Hiragana + Katakana; ``"Hiragana"``/``"Katakana"`` alone are just
    that kana script.
    """
    if isinstance(target, str):
        key = target.strip().lower()
        if key in _SCRIPT_NAMES:
            return _SCRIPT_NAMES[key]
        if key in _LANG_TO_SCRIPTS:
            return _LANG_TO_SCRIPTS[key]
        base = key.replace("_", "-").split("-", 1)[0]
        if base in _LANG_TO_SCRIPTS:
            return _LANG_TO_SCRIPTS[base]
        raise ValueError(
            f"unknown target language or script {target!r}; expected an ISO 639 code (ko, zh, ja, ar, ru, "
            f"hi, th, el, he, en, ...), a language name, or a script name from {sorted(SCRIPTS)}"
        )
    scripts = frozenset()
    for item in target:
        scripts = scripts | target_scripts(item)
    if not scripts:
        raise ValueError("target: got an empty collection of scripts")
    return scripts


# Share of an answer's letters that, when they are skipped ASCII letters, triggers the one-time warning.
# A non-Latin-script answer quotes the odd Latin name or code identifier, a few letters in a hundred; a
# quarter of all its letters being Latin is a drift into English (the checker's example
# "кошка собака cat dog" has 6 of 17), which ignore_ascii=True would otherwise hide.
ASCII_WARN_SHARE = 0.25


class LanguageChecker:
    """First-confusion detector for one target language.

    Args:
        target: language or script(s), see :func:`target_scripts`.
        ignore_ascii: ignore ASCII letters ``a–z A–Z`` (default ``True``, docs/methods.md §4). Has no
            effect when the target includes Latin script (ASCII letters are then in-language).
        extra_ignored: characters never counted as confusion (e.g. ``"ー"``).

    ``checker(text)`` returns the character offset of the first confusion letter, or ``None``.

    What ``ignore_ascii`` hides is reported, not silently dropped: :meth:`skipped_ascii` counts the
    ASCII letters of a text that would have been confusion, :meth:`note_skipped_ascii` warns once per
    checker when they are at least ``ASCII_WARN_SHARE`` (25 %) of an answer's letters (a
    non-Latin-script answer drifting into English), and ``build_groups`` reports their share.
    """

    def __init__(self, target: Target, *, ignore_ascii: bool = True, extra_ignored: str = "") -> None:
        self.target = target
        self.scripts = target_scripts(target)
        self.ignore_ascii = bool(ignore_ascii)
        self.extra_ignored = frozenset(extra_ignored)
        self._warned_ascii = False

    def __repr__(self) -> str:
        return f"LanguageChecker(scripts={sorted(self.scripts)}, ignore_ascii={self.ignore_ascii})"

    def is_confusion(self, ch: str) -> bool:
        """Whether the single character ``ch`` is a letter outside the target scripts."""
        if ch in self.extra_ignored:
            return False
        if self.ignore_ascii and ch < "\x80":
            return False
        script = char_script(ch)
        return script is not None and script not in self.scripts

    def first_confusion(self, text: str, start: int = 0) -> Optional[int]:
        """Offset (into ``text``) of the first confusion letter at or after ``start``, else ``None``."""
        for i in range(start, len(text)):
            if self.is_confusion(text[i]):
                return i
        return None

    __call__ = first_confusion

    def is_clean(self, text: str) -> bool:
        """``True`` when ``text`` has no confusion letter."""
        return self.first_confusion(text) is None

    def skipped_ascii(self, text: str) -> Tuple[int, int]:
        """``(skipped, letters)``: the ASCII letters of ``text`` that are confusion only because
        ``ignore_ascii`` skips them (0 when it is off or the target includes Latin), and all letters."""
        letters = sum(1 for ch in text if char_script(ch) is not None and ch not in self.extra_ignored)
        if not self.ignore_ascii or "Latin" in self.scripts:
            return 0, letters
        return sum(1 for ch in text if ch < "\x80" and ch.isalpha() and ch not in self.extra_ignored), letters

    def note_skipped_ascii(self, text: str) -> Tuple[int, int]:
        """:meth:`skipped_ascii` of ``text``, warning once per checker when the skipped letters are at
        least ``ASCII_WARN_SHARE`` of its letters."""
        skipped, letters = self.skipped_ascii(text)
        if not self._warned_ascii and letters and skipped >= ASCII_WARN_SHARE * letters:
            self._warned_ascii = True
            warnings.warn(
                f"{self!r}: {skipped} of the {letters} letters of an answer are ASCII Latin letters, which "
                f"ignore_ascii=True does not count as confusion (e.g. {text[:60]!r}); if the target language "
                "does not use Latin script, build the checker with ignore_ascii=False to count them "
                "(this warning is shown once per checker)",
                UserWarning, stacklevel=2,
            )
        return skipped, letters


def first_confusion(text: str, target: Target, *, ignore_ascii: bool = True) -> Optional[int]:
    """Character offset of the first letter of ``text`` outside ``target``'s scripts, or ``None``.

    See :class:`LanguageChecker` (build one once when checking many strings).
    """
    return LanguageChecker(target, ignore_ascii=ignore_ascii).first_confusion(text)


def confusion_token_index(offsets: Sequence[Sequence[int]], char_offset: Optional[int]) -> Optional[int]:
    """Index ``c`` of the token that contains character ``char_offset``.

    Args:
        offsets: per-token ``(start, end)`` character spans, as returned by a fast tokenizer with
            ``return_offsets_mapping=True`` (a list of pairs or an ``(T, 2)`` tensor/array), or by
            :func:`decoded_token_offsets`. Empty spans (special tokens report ``(0, 0)``) never match.
        char_offset: the confusion character offset (``None`` passes through).

    Returns:
        The first token whose span ``start <= char_offset < end`` (a character split over several
        byte-level tokens maps to the first of them, the one that started emitting it); if none
        contains it (e.g. the character sits in whitespace a tokenizer trimmed from its spans), the
        first token starting after it; ``None`` when no token is at or after the offset.
    """
    if char_offset is None:
        return None
    spans = offsets.tolist() if hasattr(offsets, "tolist") else offsets
    after = None
    for i, (start, end) in enumerate(spans):
        if end <= start:
            continue
        if start <= char_offset < end:
            return i
        if after is None and start > char_offset:
            after = i
    return after


def update_position(token_index: Optional[int]) -> Optional[int]:
    """The TLPO update position ``u = c − 1``: the position whose logits predicted token ``c``.

    Indices are in the same sequence as ``c``; for a response-relative ``c = 0`` the update position
    is the last prompt token (``−1`` relative to the response), which callers resolve in absolute
    positions (``prompt_len + c − 1``).
    """
    return None if token_index is None else token_index - 1


def decoded_token_offsets(tokenizer, token_ids: Sequence[int], *, skip_special_tokens: bool = True
                          ) -> Tuple[str, List[Tuple[int, int]]]:
    """Decode generated ``token_ids`` and give each token its ``(start, end)`` span in that text.

    Re-tokenising a sampled response with ``return_offsets_mapping`` gives offsets of the *canonical*
    tokenisation, which need not be the sampled token sequence. This helper instead decodes growing
    prefixes, so span ``i`` is the text token ``i`` added: empty for special tokens; a byte-level
    token that ends inside a multi-byte character also covers that character, like the token that
    completes it (the same convention as fast tokenizers' offsets), so :func:`confusion_token_index`
    returns the first token that started emitting it. O(T²) decoding; responses are short.

    Returns ``(text, offsets)`` with ``text = tokenizer.decode(token_ids)``.
    """
    ids = [int(t) for t in token_ids]
    text = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    offsets: List[Tuple[int, int]] = []
    prev = 0
    for i in range(len(ids)):
        full = tokenizer.decode(ids[: i + 1], skip_special_tokens=skip_special_tokens)
        part = full.rstrip("\ufffd")
        # The decoded prefix may differ from a prefix of ``text`` in whitespace cleanup; the common
        # prefix length keeps spans monotone and inside ``text``.
        end = max(common_prefix_len(part, text), prev)
        pending = len(part) < len(full) and end < len(text)  # ends inside a multi-byte character
        offsets.append((prev, end + 1 if pending else end))
        prev = end
    return text, offsets
