"""Bring your own model: a CTR model trained in plain PyTorch here (not by recserve), exported to ONNX with
its own input and output names, compressed from ``tensors:`` data with no recserve preprocessing."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from recserve.converters.pipeline import compress
from recserve.converters.recipe import parse_recipe
from recserve.data.splits import random_split
from recserve.errors import DataError, ModelError

USERS, ITEMS, DENSE, ROWS = 300, 500, 4, 6000
POST_TRAINING = """
name: byo-post-training
stages:
  - {type: quantize, mode: int8_static, calibration_rows: 512}
  - {type: embeddings, bits: 8}
gate: {max_relative_auc_loss: 0.02}
"""


class Ctr(nn.Module):
    """Two embedding tables and an MLP: a ranker as another team would write it."""

    def __init__(self) -> None:
        super().__init__()
        self.users, self.items = nn.Embedding(USERS, 8), nn.Embedding(ITEMS, 8)
        self.mlp = nn.Sequential(nn.Linear(16 + DENSE, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, user_id: torch.Tensor, item_id: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([self.users(user_id), self.items(item_id), features], dim=1))


class TwoHeads(nn.Module):
    def __init__(self, ctr: Ctr) -> None:
        super().__init__()
        self.ctr = ctr

    def forward(self, user_id, item_id, features):
        logit = self.ctr(user_id, item_id, features)
        return torch.sigmoid(logit), logit


def make_rows(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    user = rng.integers(0, USERS, ROWS)
    item = (rng.zipf(1.3, ROWS) % ITEMS).astype(np.int64)
    feats = rng.normal(size=(ROWS, DENSE)).astype(np.float32)
    taste, appeal = rng.normal(size=USERS), rng.normal(size=ITEMS)
    logit = taste[user] * appeal[item] + feats[:, 0] - 0.5 * feats[:, 1]
    label = (rng.random(ROWS) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    return {"user_id": user.astype(np.int64), "item_id": item, "features": feats, "label": label}


def export(module: nn.Module, rows: dict[str, np.ndarray], outputs: list[str]) -> onnx.ModelProto:
    args = tuple(torch.from_numpy(rows[k][:8]) for k in ("user_id", "item_id", "features"))
    buf = io.BytesIO()
    torch.onnx.export(module, args, buf, input_names=["user_id", "item_id", "features"], output_names=outputs,
                      dynamic_axes={k: {0: "batch"} for k in ["user_id", "item_id", "features", *outputs]},
                      opset_version=17, dynamo=False)
    return onnx.load_from_string(buf.getvalue())


@pytest.fixture(scope="module")
def byo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """(model.onnx, rows.npz, the rows): trained here with plain PyTorch, scored as logits."""
    folder = tmp_path_factory.mktemp("byo")
    rows = make_rows()
    torch.manual_seed(0)
    model = Ctr()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    tensors = {k: torch.from_numpy(v) for k, v in rows.items()}
    for _ in range(60):
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(
            model(tensors["user_id"], tensors["item_id"], tensors["features"]).squeeze(1), tensors["label"])
        loss.backward()
        opt.step()
    model.eval()
    onnx.save(export(model, rows, ["logit"]), folder / "model.onnx")
    onnx.save(export(TwoHeads(model), rows, ["probability", "logit"]), folder / "two_heads.onnx")
    np.savez(folder / "rows.npz", **rows)
    return folder / "model.onnx", folder / "rows.npz", rows


def independent_auc(model: Path, rows: dict[str, np.ndarray], output: str = "logit") -> float:
    """The held-out AUC computed without recserve's evaluation: onnxruntime and scikit-learn on the test rows."""
    _, test = random_split(ROWS, 0.2, 0)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    (scores,) = sess.run([output], {k: rows[k][test] for k in ("user_id", "item_id", "features")})
    return float(roc_auc_score(rows["label"][test], scores.ravel()))


def test_baseline_is_exactly_the_models_own(byo, tmp_path: Path) -> None:
    model, npz, rows = byo
    report = compress(model, parse_recipe(POST_TRAINING), tmp_path / "out", data_spec=f"tensors:{npz}", speed=False)
    assert report.baseline.auc == pytest.approx(independent_auc(model, rows), abs=1e-9)
    assert report.baseline.auc > 0.65, "the model learned something"
    assert report.score_output == "logit" and report.score_kind == "logit"
    assert report.held_out_rows == round(ROWS * 0.2) and report.validation.rows > 0
    assert report.gate.passed, report.gate.reasons
    assert report.size_ratio > 1.5 and report.distinct_score_ratio > 0.9
    tables = report.stages[1].details["tables"]
    assert set(tables) == {"users.weight", "items.weight"}
    # the compressed model takes the same inputs and gives the same output
    out = onnx.load(tmp_path / "out" / "model.onnx")
    assert [i.name for i in out.graph.input] == ["user_id", "item_id", "features"]
    assert [o.name for o in out.graph.output] == ["logit"]
    assert not (tmp_path / "out" / "preprocessing.json").exists()


def test_parquet_gives_the_same_baseline(byo, tmp_path: Path) -> None:
    model, _, rows = byo
    table = pa.table({"user_id": rows["user_id"], "item_id": rows["item_id"], "label": rows["label"],
                      "features": pa.FixedSizeListArray.from_arrays(pa.array(rows["features"].ravel()), DENSE)})
    pq.write_table(table, tmp_path / "rows.parquet")
    report = compress(model, parse_recipe(POST_TRAINING), tmp_path / "out", data_spec=f"tensors:{tmp_path}/rows.parquet",
                      speed=False)
    assert report.baseline.auc == pytest.approx(independent_auc(model, rows), abs=1e-9)


def test_several_outputs_need_score_output(byo, tmp_path: Path) -> None:
    model, npz, rows = byo
    two = model.parent / "two_heads.onnx"
    with pytest.raises(ModelError, match=r"outputs \['probability', 'logit'\].*--score-output"):
        compress(two, parse_recipe(POST_TRAINING), tmp_path / "a", data_spec=f"tensors:{npz}", speed=False)
    with pytest.raises(ModelError, match="'prob' is not an output"):
        compress(two, parse_recipe(POST_TRAINING), tmp_path / "b", data_spec=f"tensors:{npz}", speed=False,
                 score_output="prob")
    report = compress(two, parse_recipe(POST_TRAINING), tmp_path / "c", data_spec=f"tensors:{npz}", speed=False,
                      score_output="probability")
    assert report.score_kind == "probability"
    assert report.baseline.auc == pytest.approx(independent_auc(two, rows, "probability"), abs=1e-9)


def test_search_runs_the_post_training_steps(byo, tmp_path: Path) -> None:
    model, npz, _ = byo
    recipe = parse_recipe("search: {time_budget_s: 120}\ngate: {max_relative_auc_loss: 0.01}\n")
    report = compress(model, recipe, tmp_path / "out", data_spec=f"tensors:{npz}", speed=False)
    assert report.mode == "search" and report.search is not None
    names = [c.name for c in report.search.candidates]
    assert names[0] == "baseline" and not any(n.startswith("student") for n in names), "no students for foreign inputs"
    assert any("emb int" in n for n in names)
    assert report.gate.passed and report.size_ratio > 1.5


def _rows_with(tmp_path: Path, rows: dict[str, np.ndarray], **changes) -> str:
    changed = {k: v for k, v in {**rows, **changes}.items() if v is not None}
    np.savez(tmp_path / "bad.npz", **changed)
    return f"tensors:{tmp_path}/bad.npz"


@pytest.mark.parametrize(("change", "needles"), [
    ({"item_id": "out of range"}, ["input 'item_id'", "items.weight", "500 rows", "ids seen 0 to 5,"]),
    ({"user_id": "int32"}, ["input 'user_id' is int64 in the model but int32"]),
    ({"features": "wide"}, ["input 'features' needs size 4 on axis 1", "['N', 5]"]),
    ({"features": None}, ["no array for model input(s) ['features']"]),
    ({"extra": np.zeros(ROWS)}, ["arrays ['extra'] feed no model input"]),
    ({"label": np.full(ROWS, 2.0)}, ["'label' must be one 0/1 value per row"]),
], ids=["id-range", "dtype", "shape", "missing", "extra", "label"])
def test_data_that_does_not_fit_is_one_clear_error_before_any_stage(byo, tmp_path: Path, change, needles) -> None:
    model, _, rows = byo
    key, how = next(iter(change.items()))
    value = how
    if isinstance(how, str) and how == "out of range":
        value = rows["item_id"].copy()
        value[::100] += 5000  # a team's ids from a newer vocabulary than the model's table
    elif isinstance(how, str) and how == "int32":
        value = rows["user_id"].astype(np.int32)
    elif isinstance(how, str) and how == "wide":
        value = np.concatenate([rows["features"], rows["features"][:, :1]], axis=1)
    spec = _rows_with(tmp_path, rows, **{key: value})
    with pytest.raises(DataError) as e:
        compress(model, parse_recipe(POST_TRAINING), tmp_path / "out", data_spec=spec, speed=False)
    msg = str(e.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg
    assert not (tmp_path / "out").exists(), "nothing is written for data that does not fit"
