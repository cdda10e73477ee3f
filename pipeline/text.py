"""Caption text: AttnGAN's tokeniser and the vocabulary every stage shares (``vocab.json``).

Tokenisation follows AttnGAN: lower-case, ``\\w+`` tokens, non-ASCII characters dropped from
each token (a token left empty is dropped). Ids are list positions in ``vocab.json``; the
specials come first so their ids are fixed project-wide: ``<pad>`` 0, ``<unk>`` 1, ``<bos>`` 2,
``<eos>`` 3.

Caption length rule: every stage keeps the first ``max_caption_words`` tokens of a caption
and drops the rest (AttnGAN drops random words at training time; a fixed rule keeps the
attention and memory artifacts deterministic). The vocabulary counts every token.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from cpgan.errors import CpganError
from cpgan.pipeline.artifacts import atomic_write_text

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIALS = (PAD, UNK, BOS, EOS)
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)
_TOKEN = re.compile(r"\w+")


def plural(word: str) -> str:
    """English plural of a category word (box -> boxes, bus -> buses, dog -> dogs): the form
    the toy captions use and the one COCO's category words are matched in."""
    return word + ("es" if word.endswith(("s", "x", "ch", "sh")) else "s")


def tokenize(caption: str) -> list[str]:
    """AttnGAN's tokenisation of one caption."""
    tokens = (t.encode("ascii", "ignore").decode("ascii") for t in _TOKEN.findall(caption.lower()))
    return [t for t in tokens if t]


@dataclass(frozen=True)
class Vocabulary:
    """Tokens (id = index), their training-caption counts, and the cut-off that made them."""

    tokens: tuple[str, ...]
    counts: tuple[int, ...]
    min_count: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "_ids", {t: i for i, t in enumerate(self.tokens)})

    def __len__(self) -> int:
        return len(self.tokens)

    def id(self, token: str) -> int:
        return self._ids.get(token, UNK_ID)  # type: ignore[attr-defined]

    def encode(self, caption: str, max_words: int) -> list[int]:
        """Word ids of the first ``max_words`` tokens (no specials added)."""
        return [self.id(t) for t in tokenize(caption)[:max_words]]

    def decode(self, ids: Sequence[int]) -> list[str]:
        return [self.tokens[i] for i in ids]

    def to_json(self) -> str:
        return json.dumps(
            {"tokens": list(self.tokens), "counts": list(self.counts), "min_count": self.min_count},
            indent=1,
        )

    def save(self, path: Path) -> None:
        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        """Read and validate ``vocab.json``; any inconsistency is a one-line fatal error."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CpganError(f"{path}: vocabulary not found (run 'cpgan-prep vocab')") from None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise CpganError(f"{path}: not valid JSON ({exc})") from None
        except OSError as exc:
            raise CpganError(f"{path}: cannot read the vocabulary ({exc.strerror or exc})") from None
        if not isinstance(data, dict) or not {"tokens", "counts", "min_count"} <= data.keys():
            raise CpganError(f"{path}: expected an object with tokens, counts and min_count")
        tokens, counts = data["tokens"], data["counts"]
        if not (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)):
            raise CpganError(f"{path}: 'tokens' must be a list of strings")
        if not (isinstance(counts, list) and all(type(c) is int and c >= 0 for c in counts)):
            raise CpganError(f"{path}: 'counts' must be a list of non-negative integers")
        if len(tokens) != len(counts):
            raise CpganError(f"{path}: {len(tokens)} tokens but {len(counts)} counts")
        if tuple(tokens[: len(SPECIALS)]) != SPECIALS:
            raise CpganError(f"{path}: the first tokens must be {' '.join(SPECIALS)}")
        if len(set(tokens)) != len(tokens):
            raise CpganError(f"{path}: duplicate tokens")
        if type(data["min_count"]) is not int or data["min_count"] < 1:
            raise CpganError(f"{path}: 'min_count' must be an integer of at least 1")
        return cls(tuple(tokens), tuple(counts), data["min_count"])


def build_vocabulary(captions: Iterable[str], min_count: int = 1) -> Vocabulary:
    """Count tokens over (training) captions; keep those seen ``min_count`` times or more.

    Words are ordered by count (descending) then alphabetically, so the file is the same for
    the same captions whatever order they arrive in.
    """
    if min_count < 1:
        raise CpganError(f"min_count must be at least 1, got {min_count}")
    counter: Counter[str] = Counter()
    for caption in captions:
        counter.update(tokenize(caption))
    words = sorted((w for w, c in counter.items() if c >= min_count), key=lambda w: (-counter[w], w))
    return Vocabulary(
        tokens=SPECIALS + tuple(words),
        counts=(0,) * len(SPECIALS) + tuple(counter[w] for w in words),
        min_count=min_count,
    )
