"""The router's text search path (issue 19) with a fake cloud, an injected clock and a tiny encoder built here
(a word-piece tokenizer of a dozen words, an ONNX graph summing one-hot rows): the same routing as a ranking
(cloud, edge, last rung; breaker, estimates, cache), and what a search request can get wrong."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from recserve.encoder.artifact import EncoderInfo, Parity
from recserve.serving.config import RouterConfig
from recserve.serving.protos.recommender_pb2 import RankRequest
from recserve.serving.router import RankError, Router
from recserve.serving.scorers import CloudError, SearchAnswer

WORDS = ["drill", "saw", "hammer", "paint", "red", "blue", "cordless", "##s"]
VOCAB = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
PRODUCTS = {"p-drill": "cordless drill", "p-saw": "saw", "p-hammer": "hammer", "p-red": "red paint",
            "p-blue": "blue paint"}


def tiny_encoder(directory: Path, order: list[int] | None = None) -> None:
    """A real encoder directory: tokenizer.json (word pieces), model.onnx (sum of one-hot rows of the words,
    special tokens zero; ``order`` permutes the one-hot columns: another space), encoder.json."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    directory.mkdir(parents=True)
    tok = Tokenizer(models.WordPiece(VOCAB, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(directory / "tokenizer.json"))
    table = np.zeros((len(VOCAB), len(WORDS)), np.float32)
    table[4:, :] = np.eye(len(WORDS), dtype=np.float32)[:, order or list(range(len(WORDS)))]
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["rows"]),
             helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),
             helper.make_node("Mul", ["rows", "mask3"], ["kept"]),
             helper.make_node("ReduceSum", ["kept", "axis1"], ["embedding"], keepdims=0)]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info(n, TensorProto.INT64, ["b", "s"])
                        for n in ("input_ids", "attention_mask")],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["b", len(WORDS)])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array([2], np.int64), "axis2"),
         numpy_helper.from_array(np.array([1], np.int64), "axis1")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              str(directory / "model.onnx"))
    info = EncoderInfo(source="tiny", dim=len(WORDS), layers=0, parameters=table.size, max_seq_length=16,
                       pooling="mean", normalize=False, opset=17, parity=Parity(texts=0, max_abs_diff=0, min_cosine=1))
    (directory / "encoder.json").write_text(info.model_dump_json())


@pytest.fixture(scope="module")
def search_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from recserve.encoder.evaluate import Encoder

    base = tmp_path_factory.mktemp("search")
    tiny_encoder(base / "encoder")
    emb = Encoder(base / "encoder", threads=1).embed(list(PRODUCTS.values()))
    (base / "index").mkdir()
    np.save(base / "index" / "embeddings.npy", emb / np.linalg.norm(emb, axis=1, keepdims=True))
    (base / "index" / "products.json").write_text(json.dumps(list(PRODUCTS)))
    return base / "encoder", base / "index"


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class FakeCloud:
    """Matches CloudScorer's ``search``; ``score`` is never called by a search."""

    def __init__(self, clock: Clock):
        self.clock, self.took_s, self.fail, self.calls = clock, 0.0, None, []

    async def search(self, model: str, query: str, k: int, timeout_s: float) -> SearchAnswer:
        self.calls.append((model, query, k, timeout_s))
        self.clock.t += self.took_s
        if self.fail is not None:
            raise self.fail
        return SearchAnswer(["c1", "c2", "c3"][:k], np.array([0.9, 0.8, 0.7][:k], np.float32), "1")

    async def score(self, *a):  # pragma: no cover - a search never ranks
        raise AssertionError("a search called the ranker")

    async def close(self) -> None:
        pass


def rig(search_dirs, **over) -> tuple[Router, FakeCloud, Clock]:
    encoder, index = search_dirs
    raw = {"default_model": "search", "searches": {"search": {"edge_encoder": str(encoder), "edge_index": str(index),
                                                              "top_k": 3}},
           "cache_ttl_s": 0, "breaker_failures": 2, "breaker_cooldown_s": 2.0, "edge_latency_ms": 2.0,
           "margin_ms": 1.0, "margin_share": 0.0, **over}
    clock = Clock()
    cloud = FakeCloud(clock)
    return Router(RouterConfig.model_validate(raw), cloud=cloud, clock=clock), cloud, clock


def ask(router: Router, query: str = "drill", budget_ms: float | None = None, **kw):
    return asyncio.run(router.rank(RankRequest(request_id="q", model="search", query=query, **kw), budget_ms))


def test_the_cloud_answers_a_typed_query(search_dirs) -> None:
    router, cloud, _ = rig(search_dirs)
    r = ask(router, "cordless drill", 100)
    assert (r.served_by, list(r.items), r.version, r.model) == ("cloud", ["c1", "c2", "c3"], "1", "search")
    assert cloud.calls[0][:3] == ("search", "cordless drill", 3)  # top_k 0: the route's default


def test_the_edge_answers_when_the_cloud_fails_and_its_cost_is_measured(search_dirs) -> None:
    router, cloud, clock = rig(search_dirs)
    cloud.fail = CloudError("unavailable", "gone")
    r = ask(router, "red paint", 100, top_k=2)
    assert (r.served_by, r.reason) == ("edge", "cloud failed: answered from edge")
    assert list(r.items) == ["p-red", "p-blue"] and r.scores[0] > r.scores[1]  # both paints; red first
    assert ask(router, "hammers", 100).items[0] == "p-hammer"  # a plural spelled with ##s
    ask(router, "saw", 100)
    assert len(cloud.calls) == 2  # two failures opened the circuit: the third went straight to the edge
    assert "circuit open" in ask(router, "saw", 100).reason
    assert router.searches["search"].estimate.mean < 2.0 * 0.9**3 + 1e-9  # four edge answers of 0 ms measured


def test_a_budget_the_cloud_cannot_meet_goes_to_the_edge_and_one_neither_meets_to_the_last_rung(search_dirs) -> None:
    router, cloud, clock = rig(search_dirs, cache_ttl_s=1.0, stale_s=60.0)
    cloud.took_s = 0.030  # the cloud takes 30 ms on the injected clock
    for _ in range(5):
        clock.t += 2.0  # past the cache's ttl: each call goes to the cloud
        assert ask(router, "drill", 200).served_by == "cloud"
    clock.t += 2.0
    r = ask(router, "drill", 10)
    assert r.served_by == "edge", r.reason
    router.searches["search"].estimate.observe(50.0)  # the edge slows down too
    router.searches["search"].estimate.observe(50.0)
    r = ask(router, "drill", 10)
    assert r.served_by == "fallback" and list(r.items) == ["c1", "c2", "c3"] and "cached answer" in r.reason
    r = ask(router, "saw", 10)  # never answered before: nothing stale to give
    assert (r.served_by, list(r.items)) == ("fallback", [])


@pytest.mark.parametrize(("kw", "needle"), [
    ({"query": ""}, "send the typed query"),
    ({"query": "   "}, "send the typed query"),
    ({"query": "x" * 300}, "at most 256 characters"),
    ({"candidate_item_ids": ["a"]}, "send no candidate_item_ids"),
    ({"top_k": 5000}, "top_k must be 0 to 1000"),
    ({"top_k": -1}, "top_k must be 0 to 1000"),
])
def test_what_a_search_request_can_get_wrong(search_dirs, kw: dict, needle: str) -> None:
    router, cloud, _ = rig(search_dirs)
    with pytest.raises(RankError) as e:
        ask(router, **({"query": "drill"} | kw))
    assert e.value.code == "INVALID_ARGUMENT" and needle in str(e.value) and cloud.calls == []


def test_an_unknown_model_names_the_searches_too(search_dirs) -> None:
    router, _, _ = rig(search_dirs)
    with pytest.raises(RankError, match=r"\['search'\]") as e:
        asyncio.run(router.rank(RankRequest(model="nope", query="drill")))
    assert e.value.code == "NOT_FOUND"


def test_the_config_needs_a_model_or_a_search_and_one_name_for_each(search_dirs) -> None:
    encoder, index = search_dirs
    search = {"edge_encoder": str(encoder), "edge_index": str(index)}
    with pytest.raises(ValueError, match="at least one of"):
        RouterConfig.model_validate({})
    with pytest.raises(ValueError, match="both in models and in searches"):
        RouterConfig.model_validate({"default_model": "x", "searches": {"x": search}, "models": {"x": {
            "rankers": [{"triton_model": "r", "edge_model": "m.onnx"}], "catalog": ".", "preprocessing": "p"}}})
    from recserve.serving.config import missing_files

    cfg = RouterConfig.model_validate({"default_model": "s", "searches": {"s": search | {"edge_index": "/nope"}}})
    assert missing_files(cfg) == ["searches.s.edge_index: /nope"]


def test_an_index_built_by_another_encoder_is_refused(search_dirs, tmp_path: Path) -> None:
    encoder, index = search_dirs
    (tmp_path / "index").mkdir()
    np.save(tmp_path / "index" / "embeddings.npy", np.ones((5, 3), np.float32))
    (tmp_path / "index" / "products.json").write_text(json.dumps(list(PRODUCTS)))
    with pytest.raises(ValueError, match="build the index with this encoder"):
        rig((encoder, tmp_path / "index"))


def ranker_dir(directory: Path, weights: dict[str, float], depth: int = 5) -> Path:
    """A ``search_ranker`` version directory: a linear graph over the named features (the others weigh 0)."""
    from recserve.models.search_ranker import Fitted
    from recserve.triton.search_features import FEATURES

    w = np.array([[weights.get(f, 0.0)] for f in FEATURES], np.float32)
    model = Fitted(np.zeros(len(FEATURES), np.float32), np.ones(len(FEATURES), np.float32), [(w, np.zeros(1, np.float32))], 1)
    directory.mkdir(parents=True)
    onnx.save(model.to_onnx(), str(directory / "model.onnx"))
    (directory / "search_ranker.json").write_text(json.dumps({"depth": depth}))
    return directory


def test_the_edge_reorders_with_the_searchs_ranker(search_dirs, tmp_path: Path) -> None:
    """With ``edge_ranker`` the edge scores the ``depth`` nearest products with the ranker's graph and answers its
    top k: a ranker that prefers the least similar title reverses the encoder's order."""
    from recserve.triton.search_features import TitleTerms

    encoder, index = search_dirs
    indexed = tmp_path / "index"
    indexed.mkdir()
    for f in ("embeddings.npy", "products.json"):
        (indexed / f).write_bytes((index / f).read_bytes())
    TitleTerms.build(list(PRODUCTS.values())).save(indexed)
    reverse = ranker_dir(tmp_path / "reverse", {"cosine": -1.0})
    router, cloud, _ = rig((encoder, indexed), searches={"search": {
        "edge_encoder": str(encoder), "edge_index": str(indexed), "edge_ranker": str(reverse)}})
    cloud.fail = CloudError("unavailable", "gone")
    got = ask(router, "red paint", 100, top_k=5)  # cosines: red paint 1, blue paint 0.5, the others 0
    assert got.served_by == "edge" and list(got.items)[-2:] == ["p-blue", "p-red"], list(got.items)
    assert set(got.items) == set(PRODUCTS) and got.scores[0] >= got.scores[-1]
    words = ranker_dir(tmp_path / "words", {"word_share": 1.0}, depth=5)
    edge = type(router.searches["search"].edge)(encoder, indexed, ranker=words)
    assert edge.search("red paint", 1).items == ["p-red"] and edge.search("hammer", 1).items == ["p-hammer"]


def test_a_ranker_needs_an_index_with_title_terms(search_dirs, tmp_path: Path) -> None:
    encoder, index = search_dirs
    ranker = ranker_dir(tmp_path / "r", {"cosine": 1.0})
    with pytest.raises(ValueError, match="no title terms"):
        rig(search_dirs, searches={"search": {"edge_encoder": str(encoder), "edge_index": str(index),
                                              "edge_ranker": str(ranker)}})


def test_search_index_into_a_repository_it_cannot_join_writes_nothing(search_dirs, tmp_path: Path) -> None:
    """A product_index served with another interface (an older recserve's, without the ranker's features):
    refused before any model of the search is written."""
    from tritonclient.grpc import model_config_pb2 as mc

    from recserve.converters.triton_config import to_pbtxt
    from recserve.errors import ConfigError
    from recserve.triton.search import build_search

    encoder, _ = search_dirs
    old = mc.ModelConfig(name="product_index", backend="python", max_batch_size=0)
    old.input.add(name="embedding", data_type=mc.TYPE_FP32, dims=[1, len(WORDS)])
    old.output.add(name="items", data_type=mc.TYPE_STRING, dims=[-1])
    (tmp_path / "product_index" / "1").mkdir(parents=True)
    (tmp_path / "product_index" / "config.pbtxt").write_text(to_pbtxt(old))
    with pytest.raises(ConfigError, match="product_index: the new model's inputs/outputs"):
        build_search(encoder, "synthetic:20,products=30", tmp_path, ranker=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["product_index"]
    assert sorted(p.name for p in (tmp_path / "product_index").iterdir()) == ["1", "config.pbtxt"]


def test_a_catalog_encoder_must_share_the_query_encoders_space(search_dirs, tmp_path: Path) -> None:
    """``--catalog-encoder``: the titles embedded by another encoder; one of another width, or whose embeddings of
    the same titles disagree with the query encoder's, is refused before anything is written."""
    from recserve.errors import ConfigError
    from recserve.triton.search import build_search

    encoder, _ = search_dirs
    tiny_encoder(tmp_path / "shuffled", order=list(range(len(WORDS)))[::-1])
    with pytest.raises(ConfigError, match="do not share a space"):
        build_search(encoder, "synthetic:20,products=30", tmp_path / "repo", ranker=False,
                     catalog_encoder=tmp_path / "shuffled")
    assert not (tmp_path / "repo").exists()
    built = build_search(encoder, "synthetic:20,products=30", tmp_path / "repo", ranker=False, catalog_encoder=encoder)
    assert [p.name for p in built.written][:3] == ["1", "1", "1"] and built.ranker is None
