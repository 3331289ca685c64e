"""Search relevance data for text encoders: real queries, product titles, graded judgments.

``search:PATH[,query=COL][,title=COL][,relevance=COL][,product=COL]`` reads a CSV (UTF-8, else Latin-1) or
parquet file of judged (query, product) pairs; the defaults are ``query``, ``product_title``, ``relevance`` and
``product_uid`` (products without an id column are told apart by title). Relevance may be graded or binary;
a pair's gain is its relevance minus the file's lowest. The corpus is every distinct product, with the first
title it appears with. Products a query was not judged against count as gain 0.

``synthetic[:QUERIES][,products=N][,seed=N]`` is the project's own text for tests and the demo: product
titles of brand, attributes and type words, and queries made of some of a product's words (a few misspelled),
judged 3 for their product, 2 for the same type with a shared attribute, 1.5 for the same type, 1 otherwise.

The queries, not the pairs, are split in half, deterministically by a hash of their text: anything tuned is
tuned on ``tuning``; ``held_out`` is for the report.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recserve.errors import DataError

DEFAULT_COLUMNS = {"query": "query", "title": "product_title", "relevance": "relevance", "product": "product_uid"}


@dataclass
class SearchData:
    """Products (ids and titles), queries, and each query's judged products with their gains."""

    product_ids: list[str]
    titles: list[str]
    queries: list[str]
    judgments: list[dict[int, float]]
    """Per query: product index -> gain (>= 0; unjudged products are 0)."""
    held_out: np.ndarray
    """Per query: True for the held-out half (the report), False for the tuning half."""
    spec: str = ""

    def split(self, held_out: bool) -> tuple[list[str], list[dict[int, float]]]:
        """The queries of one half and their judgments."""
        keep = np.flatnonzero(self.held_out == held_out)
        return [self.queries[i] for i in keep], [self.judgments[i] for i in keep]


def split_queries(queries: list[str], seed: int = 0) -> np.ndarray:
    """True for the held-out half: the queries whose hash (with ``seed``) sorts in the upper half."""
    keys = [hashlib.sha1(f"{seed}\0{q}".encode()).digest() for q in queries]
    order = sorted(range(len(queries)), key=keys.__getitem__)
    held = np.zeros(len(queries), dtype=bool)
    held[order[len(order) // 2:]] = True
    return held


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows as strings) of a CSV or parquet file."""
    if not path.is_file():
        raise DataError(f"search data {path} does not exist")
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several kinds for a bad file
            raise DataError(f"{path} is not a readable parquet file: {str(e).splitlines()[0]}") from e
        cols = table.column_names
        data = {c: table.column(c).to_pylist() for c in cols}
        return cols, [{c: "" if data[c][i] is None else str(data[c][i]) for c in cols} for i in range(table.num_rows)]
    for encoding in ("utf-8", "latin-1"):
        try:
            with open(path, newline="", encoding=encoding) as f:
                reader = csv.DictReader(f)
                rows = list(reader)
                return list(reader.fieldnames or []), rows
        except UnicodeDecodeError:
            continue
        except csv.Error as e:
            raise DataError(f"{path} is not a readable CSV file: {e}") from e
    raise DataError(f"{path} is neither UTF-8 nor Latin-1 text")


def read_search(path: Path, columns: dict[str, str] | None = None, seed: int = 0) -> SearchData:
    """The judged pairs of one file (see the module's docstring); DataError naming what is wrong."""
    cols = {**DEFAULT_COLUMNS, **(columns or {})}
    names, rows = _rows(Path(path))
    missing = [f"{opt}={cols[opt]}" for opt in ("query", "title", "relevance") if cols[opt] not in names]
    if missing:
        raise DataError(f"{path} has no column(s) {', '.join(missing)}; its columns are {names}: name yours with "
                        f"search:PATH,query=COL,title=COL,relevance=COL")
    if not rows:
        raise DataError(f"{path} has no rows")
    by_id = cols["product"] in names
    products: dict[str, int] = {}
    titles: list[str] = []
    queries: dict[str, int] = {}
    pairs: list[tuple[int, int, float]] = []
    for n, row in enumerate(rows, start=2):
        query, title = row[cols["query"]].strip(), row[cols["title"]].strip()
        try:
            relevance = float(row[cols["relevance"]])
        except (TypeError, ValueError):
            raise DataError(f"{path} line {n}: relevance {row[cols['relevance']]!r} is not a number") from None
        if not np.isfinite(relevance):
            raise DataError(f"{path} line {n}: relevance {relevance} is not finite")
        if not query or not title:
            continue
        key = row[cols["product"]].strip() if by_id else title
        if key not in products:
            products[key] = len(titles)
            titles.append(title)
        q = queries.setdefault(query, len(queries))
        pairs.append((q, products[key], relevance))
    if not pairs:
        raise DataError(f"{path}: no row has both a query and a title")
    low = min(r for _, _, r in pairs)
    judgments: list[dict[int, float]] = [{} for _ in queries]
    for q, p, r in pairs:
        judgments[q][p] = max(judgments[q].get(p, 0.0), r - low)
    qs = list(queries)
    return SearchData(list(products), titles, qs, judgments, split_queries(qs, seed))


_BRANDS = ["Acme", "Northwind", "Ridgeline", "Bolt", "Evergreen", "Summit", "Harbor", "Keystone", "Pioneer", "Atlas",
           "Cobalt", "Maple", "Granite", "Falcon", "Redwood", "Vertex"]
_TYPES = ["drill", "faucet", "lawn mower", "ladder", "paint", "ceiling fan", "toilet", "water heater", "light bulb",
          "garden hose", "table saw", "door lock", "shower head", "tile", "vanity", "refrigerator", "grill", "rug",
          "extension cord", "smoke detector", "wheelbarrow", "work bench", "air filter", "deck screw"]
_ATTRIBUTES = ["cordless", "stainless steel", "white", "black", "brushed nickel", "outdoor", "heavy duty", "led",
               "20-volt", "compact", "adjustable", "energy star", "oak", "chrome", "portable", "waterproof",
               "12 in.", "3/4 in.", "50 ft.", "2-pack"]


def _misspell(word: str, rng: np.random.Generator) -> str:
    if len(word) < 4:
        return word
    i = int(rng.integers(1, len(word) - 2))
    return word[:i] + word[i + 1] + word[i] + word[i + 2:]


def synthetic_search(n_queries: int = 400, n_products: int = 1500, seed: int = 0) -> SearchData:
    """The project's own search text (see the module's docstring), deterministic by ``seed``."""
    if n_queries < 2 or n_products < 2:
        raise DataError("synthetic search data needs at least 2 queries and 2 products")
    rng = np.random.default_rng(seed)
    kinds = rng.integers(0, len(_TYPES), n_products)
    brands = rng.integers(0, len(_BRANDS), n_products)
    attrs = [sorted(rng.choice(len(_ATTRIBUTES), 2, replace=False).tolist()) for _ in range(n_products)]
    titles = [f"{_BRANDS[b]} {_ATTRIBUTES[a[0]]} {_TYPES[k]} {_ATTRIBUTES[a[1]]}".title()
              for b, k, a in zip(brands, kinds, attrs)]
    by_type: dict[int, list[int]] = {}
    for p, k in enumerate(kinds):
        by_type.setdefault(int(k), []).append(p)
    queries, judgments = [], []
    seen: set[str] = set()
    while len(queries) < n_queries:
        p = int(rng.integers(n_products))
        words = [_TYPES[kinds[p]]]
        if rng.random() < 0.7:
            words.insert(0, _ATTRIBUTES[attrs[p][int(rng.integers(2))]])
        if rng.random() < 0.3:
            words.insert(0, _BRANDS[brands[p]].lower())
        if rng.random() < 0.15:
            words[-1] = _misspell(words[-1], rng)
        query = " ".join(words)
        if query in seen:
            continue
        seen.add(query)
        judged = {p: 2.0}
        same = [o for o in by_type[int(kinds[p])] if o != p]
        for o in rng.choice(same, min(5, len(same)), replace=False) if same else []:
            judged[int(o)] = 1.0 if set(attrs[int(o)]) & set(attrs[p]) else 0.5
        for o in rng.choice(n_products, 3, replace=False):
            judged.setdefault(int(o), 0.0)
        queries.append(query)
        judgments.append(judged)
    return SearchData([f"p{i}" for i in range(n_products)], titles, queries, judgments, split_queries(queries, seed))


def load_search(spec: str, seed: int = 0) -> SearchData:
    """The search data a spec names: ``search:PATH[,...]`` or ``synthetic[:QUERIES][,products=N][,seed=N]``."""
    from recserve.data.spec import parse_spec

    s = parse_spec(spec, search=True)
    if s.kind == "search":
        columns = {k: str(v) for k, v in s.options.items()}
        data = read_search(Path(s.path), columns, seed)
    else:
        data = synthetic_search(int(s.path) if s.path else 400, int(s.options.get("products", 1500)),
                                int(s.options.get("seed", seed)))
    data.spec = spec
    return data
