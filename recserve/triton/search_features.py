"""What the search ranker sees of a (query, product) pair: the encoder's cosine and how the query's words
match the product's title. Pure numpy (and hashlib): the Triton ``product_index`` model and the router's edge
search compute them with this code, ``recserve search-index`` when it trains the ranker.

A text's terms are its lower-cased runs of letters and digits ("3/4 in. Oak" -> ``3``, ``4``, ``in``, ``oak``),
each a set (a title that repeats a word counts it once); its character trigrams are those of each term with
``#`` at both ends ("oak" -> ``#oa``, ``oak``, ``ak#``), so a misspelt word still shares most of them. Both are
kept as 64-bit hashes. A term's weight is BM25's inverse document frequency over the catalog's titles
(``ln(1 + (N - df + 0.5) / (df + 0.5))``; a term no title has gets the highest).

The features of one candidate product (``FEATURES``, in this order):

- ``cosine``: the encoder's cosine of the query and the title;
- ``cosine_gap``: that cosine less the best candidate's (0 for the nearest);
- ``word_share``: the share of the query's terms the title has;
- ``weighted_word_share``: the same, each term weighted by its idf;
- ``bm25``: BM25 of the title for the query (k1 1.2, b 0.75; a term's frequency in a title is 1);
- ``trigram_share``: the share of the query's trigrams the title has;
- ``all_words``: 1 when the title has every term of the query;
- ``title_terms``: ln(1 + the title's term count);
- ``query_terms``: ln(1 + the query's term count) (the same for every candidate: it lets a ranker weigh the
  others by how long the query is).
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FEATURES = ["cosine", "cosine_gap", "word_share", "weighted_word_share", "bm25", "trigram_share", "all_words",
            "title_terms", "query_terms"]
TERMS_FILE = "terms.npz"
BM25_K1, BM25_B = 1.2, 0.75
_TERM = re.compile(r"[^\W_]+")


def terms(text: str) -> list[str]:
    """The distinct terms of ``text``, in order of first appearance."""
    return list(dict.fromkeys(_TERM.findall(text.lower())))


def trigrams(words: list[str]) -> list[str]:
    """The distinct character trigrams of ``words`` (each padded with ``#``)."""
    out: dict[str, None] = {}
    for w in words:
        padded = f"#{w}#"
        for i in range(len(padded) - 2):
            out[padded[i:i + 3]] = None
    return list(out)


def hashed(strings: list[str]) -> np.ndarray:
    """Stable 64-bit hashes of ``strings`` (int64)."""
    return np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little", signed=True)
                     for s in strings], dtype=np.int64)


def _ragged(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [n + 1], values) of a list of arrays."""
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(r) for r in rows])
    return offsets, (np.concatenate(rows) if rows else np.zeros(0, np.int64)).astype(np.int64)


def _gather(offsets: np.ndarray, values: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values of ``rows`` concatenated, the position in ``rows`` each came from)."""
    starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
    owner = np.repeat(np.arange(len(rows)), lengths)
    within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return values[np.repeat(starts, lengths) + within], owner


@dataclass
class TitleTerms:
    """The catalog's titles as hashed terms and trigrams, with the terms' idf."""

    term_offsets: np.ndarray
    term_values: np.ndarray
    gram_offsets: np.ndarray
    gram_values: np.ndarray
    vocabulary: np.ndarray
    """Every term hash of the catalog, sorted."""
    idf: np.ndarray
    """Per ``vocabulary`` entry."""
    unseen_idf: float
    title_terms: np.ndarray
    mean_title_terms: float

    @classmethod
    def build(cls, titles: list[str]) -> TitleTerms:
        words = [terms(t) for t in titles]
        term_offsets, term_values = _ragged([hashed(w) for w in words])
        gram_offsets, gram_values = _ragged([hashed(trigrams(w)) for w in words])
        vocabulary, df = np.unique(term_values, return_counts=True)
        n = len(titles)
        lengths = np.diff(term_offsets).astype(np.float32)
        return cls(term_offsets, term_values, gram_offsets, gram_values, vocabulary,
                   np.log1p((n - df + 0.5) / (df + 0.5)).astype(np.float32), float(np.log1p((n + 0.5) / 0.5)),
                   lengths, float(lengths.mean()) if n else 0.0)

    def to_bytes(self) -> bytes:
        """The contents of ``terms.npz``."""
        buf = io.BytesIO()
        np.savez(buf, term_offsets=self.term_offsets, term_values=self.term_values, gram_offsets=self.gram_offsets,
                 gram_values=self.gram_values, vocabulary=self.vocabulary, idf=self.idf,
                 unseen_idf=np.float32(self.unseen_idf), title_terms=self.title_terms,
                 mean_title_terms=np.float32(self.mean_title_terms))
        return buf.getvalue()

    def save(self, directory: Path) -> None:
        (Path(directory) / TERMS_FILE).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, directory: Path) -> TitleTerms:
        with np.load(Path(directory) / TERMS_FILE) as z:
            return cls(z["term_offsets"], z["term_values"], z["gram_offsets"], z["gram_values"], z["vocabulary"],
                       z["idf"], float(z["unseen_idf"]), z["title_terms"], float(z["mean_title_terms"]))

    def __len__(self) -> int:
        return len(self.term_offsets) - 1

    def idf_of(self, hashes: np.ndarray) -> np.ndarray:
        at = np.searchsorted(self.vocabulary, hashes).clip(0, max(len(self.vocabulary) - 1, 0))
        known = self.vocabulary[at] == hashes if len(self.vocabulary) else np.zeros(len(hashes), bool)
        return np.where(known, self.idf[at] if len(self.idf) else 0.0, self.unseen_idf).astype(np.float32)

    def features(self, query: str, products: np.ndarray, cosines: np.ndarray) -> np.ndarray:
        """float32 [len(products), len(FEATURES)]: the features of each candidate ``products`` (catalog rows)
        with its ``cosines`` for ``query``."""
        products = np.asarray(products, dtype=np.int64)
        n = len(products)
        out = np.zeros((n, len(FEATURES)), dtype=np.float32)
        if n == 0:
            return out
        cosines = np.asarray(cosines, dtype=np.float32)
        words = terms(query)
        q_terms, q_grams = hashed(words), hashed(trigrams(words))
        q_idf = self.idf_of(q_terms)
        out[:, 0] = cosines
        out[:, 1] = cosines - cosines.max()
        out[:, 7] = np.log1p(self.title_terms[products])
        out[:, 8] = np.log1p(len(q_terms))
        if len(q_terms):
            values, owner = _gather(self.term_offsets, self.term_values, products)
            order = np.argsort(q_terms)
            at = np.searchsorted(q_terms[order], values).clip(0, len(q_terms) - 1)
            hit = q_terms[order][at] == values
            found = np.bincount(owner[hit], minlength=n).astype(np.float32)
            weight = np.bincount(owner[hit], weights=q_idf[order][at][hit], minlength=n).astype(np.float32)
            out[:, 2] = found / len(q_terms)
            out[:, 3] = weight / max(float(q_idf.sum()), 1e-6)
            norm = 1 - BM25_B + BM25_B * self.title_terms[products] / max(self.mean_title_terms, 1e-6)
            out[:, 4] = weight * (BM25_K1 + 1) / (1 + BM25_K1 * norm)
            out[:, 6] = found == len(q_terms)
        if len(q_grams):
            values, owner = _gather(self.gram_offsets, self.gram_values, products)
            out[:, 5] = np.bincount(owner[np.isin(values, q_grams)], minlength=n) / len(q_grams)
        return out
