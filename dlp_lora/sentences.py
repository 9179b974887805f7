"""Where a sentence ends in a token sequence, and which tokens are a chat template's scaffolding.

The rule (one place; routing while generating and the display of routed spans both use it).
A sentence ends between token i and token i+1 when

1. token i is not a special token (``<|im_end|>``, ``</s>``, ...), and
2. the text up to token i ends with a terminator ``. ! ?`` (or the CJK ``。！？``), optionally
   followed by closing quotes or brackets, and
3. the terminator is followed by the end of the text or by whitespace: token i itself ends in
   whitespace after it, or token i+1 is a special token (the text ended), or token i+1's text
   starts with whitespace (a space or a newline) that is not followed by another terminator
   (a run such as ". ." stays one end). CJK terminators need no whitespace after them.
4. Exceptions, after pysbd's rules (Golden Rules of sentence segmentation): the word that ends
   at token i is not an abbreviation, neither a known one (``Mr. Dr. vs. etc.`` ...) nor a run of
   single letters with periods (``e.g. i.e. U.S. a.m.``); nor is it a numbered-list marker
   (``1.`` at the start of a line).

So a number (``2.5``), a URL (``www.example.com``), a file name (``setup.py``) and an ellipsis
(``...``) never end a sentence in the middle: the character after the period is no whitespace.
A newline alone is no sentence end (code, lists, chat scaffolding): it only counts as the
whitespace after a terminator. The decision about the boundary between i and i+1 reads tokens up
to i+1 only, so a generating model decides it when token i+1 arrives: the terminator stays in the
sentence it ends, and the next sentence's routing starts at token i+1.

Scaffolding. The text a chat template puts around the messages (role markers, the default system
prompt it injects) is not the conversation: :meth:`SentenceRule.content` drops it, so the router
reads what the user and assistant said. It is learned once from the template itself, by rendering
a conversation of marker messages and keeping the token runs between them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["SentenceRule", "TERMINATORS", "ABBREVIATIONS"]

TERMINATORS = (".", "!", "?", "\u3002", "\uff01", "\uff1f")
CJK_TERMINATORS = ("\u3002", "\uff01", "\uff1f")
CLOSERS = "\"')]}\u201d\u2019\u00bb"
# Words that end in a period without ending a sentence (lower case, without the period); a short
# list from pysbd's English abbreviations, the ones a model's answer is likely to use.
ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc approx fig figs no nos vol eq eqs cf al inc ltd co corp dept "
    "jan feb mar apr jun jul aug sep sept oct nov dec mon tue wed thu fri sat sun min max".split()
)
_LETTER_RUN = re.compile(r"^(?:[^\W\d_]\.){2,}$")  # e.g. i.e. U.S. a.m.
_LOOKBACK = 8  # tokens decoded back from i to find the word ending there


class SentenceRule:
    """The sentence rule (module docstring) bound to one tokenizer.

    ``ends_after(tokens, i)``: did a sentence end between tokens[i] and tokens[i+1]? Reads
    tokens[: i + 2] only. ``starts_sentence(tokens, j)``: does token j begin a new sentence
    (``ends_after(tokens, j - 1)``)? ``content(tokens)``: the tokens without chat scaffolding.
    Built once per tokenizer: one decode of the vocabulary; checks then decode a few tokens, and
    only where a terminator is.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        vocab_size = len(tokenizer)
        texts = tokenizer.batch_decode([[i] for i in range(vocab_size)])
        self.special = frozenset(_special_ids(tokenizer))
        # tokens whose text may put a terminator (or a closer after one) at the end of the text
        self._candidates = frozenset(
            i for i, text in enumerate(texts)
            if i not in self.special and _ends_with_terminator(text.rstrip(), closers_only_ok=True)
        )
        self._scaffolding = _scaffolding_runs(tokenizer)

    # --- boundaries -----------------------------------------------------------------------------

    def ends_after(self, tokens: Sequence[int], i: int) -> bool:
        """True when a sentence ends between tokens[i] and tokens[i + 1] (reads tokens[: i + 2])."""
        if not 0 <= i < len(tokens) - 1 or tokens[i] not in self._candidates:
            return False
        lo = max(0, i + 1 - _LOOKBACK)
        left = self._decode(tokens[lo : i + 1])
        stripped = left.rstrip()
        if not _ends_with_terminator(stripped) or _is_exception(stripped, at_text_start=lo == 0):
            return False
        if stripped != left or stripped.rstrip(CLOSERS).endswith(CJK_TERMINATORS):
            return True  # whitespace already follows the terminator, or CJK needs none
        nxt = tokens[i + 1]
        if nxt in self.special:
            return True  # the text ended
        both = self._decode(tokens[lo : i + 2])
        right = both[len(left):] if both.startswith(left) else self._decode([nxt])
        after = right.lstrip()
        # whitespace, then not a further terminator (". ." with a tokenizer that spaces its tokens)
        return right[:1].isspace() and not (after and after[0] in TERMINATORS)

    def starts_sentence(self, tokens: Sequence[int], j: int) -> bool:
        """True when token j is the first token of a sentence after another one (reads tokens[: j + 1])."""
        return j > 0 and self.ends_after(tokens, j - 1)

    def sentence_starts(self, tokens: Sequence[int]) -> list[int]:
        """Every j > 0 where a new sentence starts."""
        return [j for j in range(1, len(tokens)) if self.starts_sentence(tokens, j)]

    # --- scaffolding ----------------------------------------------------------------------------

    def content(self, tokens: Sequence[int]) -> list[int]:
        """tokens without special tokens and without the chat template's scaffolding runs."""
        tokens = list(tokens)
        keep = [t not in self.special for t in tokens]
        for run in self._scaffolding:
            n = len(run)
            first = run[0]
            for start in range(len(tokens) - n + 1):
                if tokens[start] == first and tokens[start : start + n] == run:
                    keep[start : start + n] = [False] * n
        return [t for t, k in zip(tokens, keep, strict=True) if k]

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def _special_ids(tokenizer) -> set[int]:
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special.update(i for i, added in decoder.items() if getattr(added, "special", False))
    return special


def _ends_with_terminator(text: str, closers_only_ok: bool = False) -> bool:
    core = text.rstrip(CLOSERS)
    if closers_only_ok and text and not core:
        return True  # a closing quote that may follow a terminator in the token before
    return core.endswith(TERMINATORS)


def _is_exception(stripped: str, *, at_text_start: bool) -> bool:
    """An abbreviation or a numbered-list marker ends the text (stripped of trailing whitespace)."""
    core = stripped.rstrip(CLOSERS)
    if not core.endswith("."):
        return False
    start = max(core.rfind(" "), core.rfind("\n"), core.rfind("\t")) + 1
    word = core[start:]
    if word[:-1].lower().lstrip("(\"'") in ABBREVIATIONS or _LETTER_RUN.match(word):
        return True
    line_start = (start > 0 and core[start - 1] == "\n") or (start == 0 and at_text_start)
    return line_start and word[:-1].isdigit()


def _scaffolding_runs(tokenizer) -> list[list[int]]:
    """Token runs a chat template writes around the messages, longest first ([] without a template).

    Renders the template over marker messages and tokenizes the text between the markers: the
    role lines, the separators and any default system prompt the template injects.
    """
    if not getattr(tokenizer, "chat_template", None):
        return []
    markers = ["\u2063A1\u2063", "\u2063B2\u2063", "\u2063C3\u2063"]
    runs: set[tuple[int, ...]] = set()
    for messages in (
        [{"role": "user", "content": markers[0]}],
        [{"role": "system", "content": markers[0]}, {"role": "user", "content": markers[1]},
         {"role": "assistant", "content": markers[2]}],
    ):
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # a template that refuses this shape of conversation  # noqa: BLE001
            continue
        pieces = re.split("|".join(map(re.escape, markers)), text)
        for piece in pieces:
            ids = tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else []
            special = _special_ids(tokenizer)
            if len(ids) > 1 or (ids and ids[0] in special):  # a lone word or newline may be content too
                runs.add(tuple(ids))
    return [list(run) for run in sorted(runs, key=len, reverse=True)]
