"""Vocabulary pruning: the token embedding matrix cut to the tokens a catalog and its queries use.

A BERT-style encoder's word-piece table (30,522 rows for all-MiniLM-L6-v2: about half the float graph's
bytes) mostly holds tokens an e-commerce catalog never produces (other scripts, rare names, unused
slots). Kept: every token the tokenizer produced for the texts given (the tuning queries and the
catalog's titles), the special tokens, and every single-character piece (``a``, ``##a``, ...) so that
any word can still be spelled out. The tokenizer gets the kept vocabulary in the same order, and stays
the same word-piece algorithm: a word whose pieces were all kept is tokenized exactly as before; one
with a dropped piece is split into the longest pieces that remain, and a word that cannot be spelled
from them becomes ``[UNK]``, as the original tokenizer does with a word outside its vocabulary. The
graph's embedding table keeps the same rows, renumbered.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from recserve.encoder.artifact import INPUTS, MODEL_FILE, TOKENIZER_FILE, EncoderInfo
from recserve.errors import ModelError

BATCH = 1024


@dataclass
class VocabPruning:
    before: int
    after: int
    used: int
    """Tokens the texts produced (before single characters and special tokens were added)."""
    texts: int


def used_tokens(tokenizer_json: Path, texts: Iterable[str], max_seq_length: int) -> set[int]:
    """Ids the tokenizer produces for ``texts`` (cut at ``max_seq_length`` as the encoder cuts them)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.enable_truncation(max_seq_length)
    tok.no_padding()
    texts = list(texts)
    used: set[int] = set()
    for start in range(0, len(texts), BATCH):
        for enc in tok.encode_batch(texts[start:start + BATCH]):
            used.update(enc.ids)
    return used


def kept_ids(vocab: dict[str, int], used: set[int], special: Iterable[str]) -> list[int]:
    """Old ids kept, ascending: ``used``, the special tokens and every single-character piece."""
    keep = set(used) | {vocab[t] for t in special if t in vocab}
    keep |= {i for t, i in vocab.items() if len(t) == 1 or (t.startswith("##") and len(t) == 3)}
    return sorted(keep)


def pruned_tokenizer(raw: dict, kept: list[int]) -> dict:
    """The tokenizer.json mapping ``raw`` with only ``kept`` ids, renumbered 0.. in their old order."""
    model = raw.get("model") or {}
    if model.get("type") != "WordPiece":
        raise ModelError(f"vocabulary pruning needs a WordPiece tokenizer; this one is {model.get('type')!r}")
    new_id = {old: new for new, old in enumerate(kept)}
    old_vocab: dict[str, int] = model["vocab"]
    out = json.loads(json.dumps(raw))
    out["model"]["vocab"] = {t: new_id[i] for t, i in sorted(old_vocab.items(), key=lambda kv: kv[1]) if i in new_id}

    def remap(i: int) -> int:
        if i not in new_id:
            raise ModelError(f"token id {i} of the tokenizer's configuration is not kept")
        return new_id[i]

    for added in out.get("added_tokens") or []:
        added["id"] = remap(added["id"])
    post = out.get("post_processor") or {}
    for spec in (post.get("special_tokens") or {}).values():  # TemplateProcessing
        spec["ids"] = [remap(i) for i in spec["ids"]]
    for key in ("sep", "cls"):  # BertProcessing / RobertaProcessing: [token, id]
        if isinstance(post.get(key), list):
            post[key][1] = remap(post[key][1])
    if out.get("padding"):
        out["padding"]["pad_id"] = remap(out["padding"]["pad_id"])
    return out


def _embedding_table(graph: onnx.GraphProto, rows: int) -> onnx.TensorProto:
    """The initializer a Gather looks ``input_ids`` up in (the word-piece table of ``rows`` rows)."""
    inits = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[0] in inits:
            table = inits[node.input[0]]
            if len(table.dims) == 2 and table.dims[0] == rows and _fed_by(graph, node.input[1], INPUTS[0]):
                return table
    raise ModelError(f"no Gather of input_ids into a [{rows}, dim] table in the graph: not an encoder "
                     "`recserve encoder export` wrote (prune the vocabulary before quantizing)")


def _fed_by(graph: onnx.GraphProto, name: str, source: str, depth: int = 4) -> bool:
    """Whether tensor ``name`` is ``source`` or computed from it within ``depth`` nodes."""
    if name == source:
        return True
    if depth == 0:
        return False
    return any(_fed_by(graph, i, source, depth - 1) for n in graph.node if name in n.output for i in n.input)


def prune_vocab(src: Path, texts: Iterable[str], info: EncoderInfo) -> tuple[dict[str, bytes], VocabPruning]:
    """The files of the encoder at ``src`` with the vocabulary the ``texts`` use (see the module's docstring)."""
    texts = list(texts)
    raw = json.loads((Path(src) / TOKENIZER_FILE).read_text())
    vocab = (raw.get("model") or {}).get("vocab") or {}
    used = used_tokens(Path(src) / TOKENIZER_FILE, texts, info.max_seq_length)
    special = [t["content"] for t in raw.get("added_tokens") or [] if t.get("special")]
    kept = kept_ids(vocab, used, special)
    model = onnx.load(str(Path(src) / MODEL_FILE))
    table = _embedding_table(model.graph, len(vocab))
    weights = numpy_helper.to_array(table)
    table.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(weights[kept]), table.name))
    files = {MODEL_FILE: model.SerializeToString(),
             TOKENIZER_FILE: json.dumps(pruned_tokenizer(raw, kept), ensure_ascii=False).encode()}
    return files, VocabPruning(before=len(vocab), after=len(kept), used=len(used), texts=len(texts))
