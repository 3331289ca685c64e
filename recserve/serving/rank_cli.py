"""``recserve rank``: one Rank request from flags or JSON, over gRPC or HTTP, its answer as a dict."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

from google.protobuf import json_format

from recserve.errors import ConfigError, InferenceError
from recserve.serving.client import BUDGET_HEADER
from recserve.serving.protos.recommender_pb2 import RankRequest

EXAMPLE = ('{"user": {"user_id": "17", "gender": "F"}, "candidate_item_ids": ["242", "302", "377"], '
           '"top_k": 2, "numeric": {}}')


def _pairs(values: list[str], what: str) -> dict[str, str]:
    out = {}
    for v in values:
        key, eq, value = v.partition("=")
        if not eq or not key:
            raise ConfigError(f"--{what} {v!r}: write NAME=VALUE, e.g. --{what} user_id=17")
        out[key.strip()] = value.strip()
    return out


def build_request(request_json: str | None, user: list[str], items: str | None, query: str, numeric: list[str],
                  top_k: int, model: str) -> RankRequest:
    """The RankRequest from ``--request`` JSON (``@FILE`` reads a file) or from the flags."""
    if request_json is not None:
        text = Path(request_json[1:]).read_text() if request_json.startswith("@") else request_json
        try:
            return json_format.Parse(text, RankRequest())
        except (json_format.ParseError, json.JSONDecodeError, OSError) as e:
            raise ConfigError(f"--request is not a RankRequest in JSON ({str(e).splitlines()[0]}); "
                              f"for example: {EXAMPLE}") from e
    nums = {}
    for k, v in _pairs(numeric, "numeric").items():
        try:
            nums[k] = float(v)
        except ValueError as e:
            raise ConfigError(f"--numeric {k}={v!r}: the value must be a number") from e
    ids = [i.strip() for i in (items or "").split(",") if i.strip()]
    return RankRequest(user=_pairs(user, "user"), candidate_item_ids=ids, query=query, numeric=nums, top_k=top_k,
                       model=model)


class NotUp(InferenceError):
    """The router is not there (yet): nothing listens, or it is still starting."""


def send(target: str, request: RankRequest, budget_ms: float, http: bool, wait_s: float = 0.0) -> dict:
    """The router's answer as a dict (the RankResponse's JSON fields); InferenceError with its status if refused.

    ``wait_s``: while the router is not up, try again for that long (a script that just started it).
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return _send_http(target, request, budget_ms) if http else _send_grpc(target, request, budget_ms)
        except NotUp:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.5)


def _send_grpc(target: str, request: RankRequest, budget_ms: float) -> dict:
    import grpc

    from recserve.serving.client import RouterClient

    with RouterClient(target) as client:
        try:
            response = client.rank(request, timeout_s=budget_ms / 1e3)
        except grpc.RpcError as e:
            kind = NotUp if e.code() == grpc.StatusCode.UNAVAILABLE else InferenceError
            raise kind(f"the router at {target} answered {e.code().name}: {e.details()}") from e
    return json_format.MessageToDict(response, preserving_proto_field_name=True)


def _send_http(target: str, request: RankRequest, budget_ms: float) -> dict:
    base = target if target.startswith("http") else f"http://{target}"
    body = json_format.MessageToJson(request, preserving_proto_field_name=True).encode()
    req = urllib.request.Request(f"{base.rstrip('/')}/v1/rank", data=body, method="POST",
                                 headers={"content-type": "application/json", BUDGET_HEADER: f"{budget_ms:g}"})
    try:
        with urllib.request.urlopen(req, timeout=max(1.0, budget_ms / 1e3 + 1.0)) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            detail = json.loads(e.read())
        except ValueError:
            detail = {"error": str(e.code), "message": e.reason}
        kind = NotUp if e.code in (502, 503) else InferenceError
        raise kind(f"the router at {base} answered {detail.get('error')}: {detail.get('message')}") from e
    except (urllib.error.URLError, OSError) as e:
        raise NotUp(f"cannot reach the router at {base}: {getattr(e, 'reason', e)}") from e
