"""The encoder's compression recipe, gate and vocabulary pruning as pure logic: what a user can write wrong,
and how the pruned tokenizer renumbers what it keeps."""

from __future__ import annotations

import pytest

from recserve.converters.report import GateReport
from recserve.encoder.pipeline import check_gate
from recserve.encoder.recipe import EncoderGate, parse_encoder_recipe
from recserve.encoder.report import EncoderMeasure, EncoderReport
from recserve.encoder.vocab import kept_ids, pruned_tokenizer
from recserve.errors import ConfigError, ModelError


def test_the_shipped_recipe_parses_in_order() -> None:
    from pathlib import Path

    from recserve.encoder.recipe import load_encoder_recipe

    for name, layers in (("query-encoder", 3), ("query-encoder-gpu", 2)):
        r = load_encoder_recipe(Path(__file__).resolve().parents[2] / "recipes" / f"{name}.yaml")
        assert r.name == name and [s.type for s in r.stages] == ["distill", "prune_vocab", "quantize"]
        assert r.stages[0].layers == layers
        assert r.gate.max_relative_ndcg_loss == 0.02 and r.gate.min_teacher_overlap_at_10 == 0.8
        assert r.catalog == "teacher"


@pytest.mark.parametrize(("text", "needle"), [
    ("stages: [{type: quantize}, {type: distill}]", "must be the first stage"),
    ("stages: [{type: quantize}, {type: prune_vocab}]", "before quantize"),
    ("stages: [{type: quantize}, {type: quantize}]", "once"),
    ("stages: [{type: low_rank}]", "'low_rank' is not a stage for a text encoder"),
    ("stages: [{type: quantize, mode: int4}]", "mode"),
    ("stages: []", "stages"),
    ("stages: [{type: distill, layer: 2}]", "layer"),
    ("gate: {max_relative_ndcg_loss: -1}\nstages: [{type: quantize}]", "max_relative_ndcg_loss"),
    ("- a list", "YAML mapping"),
    ("catalog: student\nstages: [{type: quantize}]", "catalog"),
    ("stages: [{type: distill, schedule: cosine}]", "schedule"),
    ("stages: [{type: distill, token_weight: -0.5}]", "token_weight"),
    ("stages: [{type: quantize, mode: fp16, outlier_ratio: 2}]", "outlier_ratio is for mode int8_dynamic"),
    ("stages: [{type: quantize, outlier_ratio: 1}]", "outlier_ratio"),
])
def test_a_wrong_recipe_says_what_is_wrong(text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_encoder_recipe(text, "r.yaml")


def _measure(**kw) -> EncoderMeasure:
    base = dict(bytes=100, parameters=10, layers=6, ndcg_at_10=0.5, recall_at_10=0.5, teacher_overlap_at_10=1.0,
                mean_cosine=1.0, ms_b1=1.0, texts_per_s_b64=100.0)
    return EncoderMeasure(**(base | kw))


def _report(size: float, speed: float, loss: float, overlap: float) -> EncoderReport:
    return EncoderReport(model="m", recipe="r", data="d", products=1, held_out_queries=1, teacher=_measure(),
                         result=_measure(), stages=[], size_ratio=size, throughput_ratio=speed,
                         relative_ndcg_loss=loss, teacher_overlap_at_10=overlap, gate=GateReport(passed=False))


def test_the_gate_names_every_limit_missed_and_only_those() -> None:
    gate = EncoderGate(max_relative_ndcg_loss=0.02, min_teacher_overlap_at_10=0.8, min_size_ratio=4,
                       min_throughput_ratio=3)
    assert check_gate(gate, _report(4.0, 3.0, 0.02, 0.8)) == []
    reasons = check_gate(gate, _report(3.9, 2.9, 0.021, 0.79))
    assert len(reasons) == 4 and "NDCG@10 loss 2.10% > 2.00%" in reasons[0] and "overlap" in reasons[1]
    assert check_gate(EncoderGate(), _report(0.5, 0.5, 0.9, 0.0)) == []  # no limits: nothing to fail


VOCAB = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "drill": 4, "##s": 5, "saw": 6, "zebra": 7, "a": 8, "##b": 9}


def test_kept_tokens_are_the_used_the_special_and_every_single_character_piece() -> None:
    assert kept_ids(VOCAB, {2, 3, 4}, ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]) == [0, 1, 2, 3, 4, 5, 8, 9]


def test_the_pruned_tokenizer_renumbers_every_id_it_names() -> None:
    raw = {"model": {"type": "WordPiece", "vocab": VOCAB, "unk_token": "[UNK]"},
           "added_tokens": [{"id": 0, "content": "[PAD]", "special": True}, {"id": 3, "content": "[SEP]", "special": True}],
           "post_processor": {"type": "TemplateProcessing", "special_tokens": {"[SEP]": {"id": "[SEP]", "ids": [3]}}},
           "padding": {"pad_id": 0, "pad_token": "[PAD]"}}
    out = pruned_tokenizer(raw, [0, 1, 3, 6, 8])
    assert out["model"]["vocab"] == {"[PAD]": 0, "[UNK]": 1, "[SEP]": 2, "saw": 3, "a": 4}
    assert [t["id"] for t in out["added_tokens"]] == [0, 2]
    assert out["post_processor"]["special_tokens"]["[SEP]"]["ids"] == [2] and raw["model"]["vocab"]["saw"] == 6
    with pytest.raises(ModelError, match="token id 3"):
        pruned_tokenizer(raw, [0, 1, 6])
    with pytest.raises(ModelError, match="WordPiece"):
        pruned_tokenizer({"model": {"type": "BPE"}}, [0])


def test_a_search_recipe_needs_a_budget_and_orders_its_candidates_cheapest_first() -> None:
    from recserve.encoder.search import candidates

    with pytest.raises(ConfigError, match="quality budget"):
        parse_encoder_recipe("search: {students: [2]}", "r.yaml")
    with pytest.raises(ConfigError, match="not both"):
        parse_encoder_recipe("search: {}\nstages: [{type: quantize}]\ngate: {max_relative_ndcg_loss: 0.02}", "r.yaml")
    r = parse_encoder_recipe("search: {students: [4, 2, 9], distill: {epochs: 2}}\n"
                             "gate: {max_relative_ndcg_loss: 0.02}", "r.yaml")
    got = candidates(r, teacher_layers=6)
    assert [name for name, _ in got] == ["2 layers", "4 layers", "6 layers (no distillation)"]
    assert [s.type for s in got[0][1]] == ["distill", "prune_vocab", "quantize"]
    assert got[0][1][0].layers == 2 and got[0][1][0].epochs == 2 and [s.type for s in got[2][1]] == [
        "prune_vocab", "quantize"]


def test_validation_queries_come_from_the_tuning_half_and_are_never_learned_from() -> None:
    from recserve.data.search import load_search
    from recserve.encoder.search import validation_split

    data = load_search("synthetic:400,products=300")
    fit, val = validation_split(data, 0.25, seed=0)
    tuning = set(data.split(held_out=False)[0])
    learned, judged = set(fit.split(held_out=False)[0]), set(val.split(held_out=True)[0])
    assert judged and learned and judged <= tuning and not judged & learned and learned | judged == tuning
    assert 0.15 < len(judged) / len(tuning) < 0.35
    assert set(data.split(held_out=True)[0]).isdisjoint(judged | learned)
