"""Load tester: schedules, payload sampling, scenario validation and the validity rule (no servers)."""

from __future__ import annotations

import numpy as np
import pytest
from hdrh.histogram import HdrHistogram

from recserve.errors import ConfigError
from recserve.loadtest.generator import RunResult, histogram
from recserve.loadtest.payloads import rank_requests, zipf_items
from recserve.loadtest.scenario import Arrivals, Scenario, load_scenario
from recserve.loadtest.schedule import rate_at, schedule


def test_constant_schedule_is_evenly_spaced_after_warmup():
    t = schedule(Arrivals(process="constant", rate=100, duration_s=2, warmup_s=1))
    assert len(t) == pytest.approx(300, abs=1)
    assert np.allclose(np.diff(t), 0.01)
    assert t[0] == pytest.approx(0.01) and t[-1] < 3.0


def test_poisson_schedule_has_the_requested_mean_rate_and_is_seeded():
    a = Arrivals(process="poisson", rate=1000, duration_s=10, warmup_s=0)
    t = schedule(a, seed=3)
    assert len(t) / 10 == pytest.approx(1000, rel=0.05)
    gaps = np.diff(t)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.1)  # exponential: cv = 1
    assert np.array_equal(t, schedule(a, seed=3)) and not np.array_equal(t, schedule(a, seed=4))


def test_bursts_multiply_the_rate_in_their_window_only():
    a = Arrivals(process="constant", rate=100, duration_s=4, warmup_s=1,
                 bursts=[{"at_s": 1, "duration_s": 1, "multiplier": 3}])
    assert rate_at(a, 0.5) == 100 and rate_at(a, 1.5) == 300 and rate_at(a, 2.5) == 100
    t = schedule(a) - 1.0  # measured time
    in_burst = ((t >= 1) & (t < 2)).sum()
    after = ((t >= 2) & (t < 3)).sum()
    assert in_burst == pytest.approx(300, abs=2) and after == pytest.approx(100, abs=2)


def test_zipf_items_are_distinct_and_skewed_to_popular_ranks():
    rng = np.random.default_rng(0)
    draws = np.concatenate([zipf_items(1000, 1.2, rng, 20) for _ in range(200)])
    assert all(len(set(zipf_items(1000, 1.2, rng, 50))) == 50 for _ in range(5))
    assert (draws < 10).mean() > 0.2  # the top 1% of items get far more than 1% of picks


def test_rank_request_pool_respects_candidate_sizes():
    s = Scenario(target="router", requests={"candidates_min": 3, "candidates_max": 7, "pool": 50, "top_k": 2})
    reqs = rank_requests(s)
    assert len(reqs) == 50
    assert all(3 <= len(r.candidate_item_ids) <= 7 and r.top_k == 2 for r in reqs)
    assert all(len(set(r.candidate_item_ids)) == len(r.candidate_item_ids) for r in reqs)


@pytest.mark.parametrize("text, needle", [
    ("target: nowhere", "target"),
    ("arrivals: {rate: -5}", "arrivals.rate"),
    ("requests: {candidates_min: 10, candidates_max: 2}", "candidates_max"),
    ("bogus: 1", "bogus"),
    ("- a list", "mapping"),
    ("arrivals: [unclosed", "not valid YAML"),
    ("url: [router-0:9000, router-1:9000]", "IPv4 ip:port"),
    ("url: []", "no router address"),
])
def test_bad_scenarios_are_config_errors_naming_the_problem(tmp_path, text, needle):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_scenario(path)
    assert str(e.value).startswith(str(path)) and needle in str(e.value)


def test_url_may_list_the_replicas_of_a_direct_ingress_router(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("target: router\nurl: [127.0.0.1:9000, 127.0.0.1:9001]\n")
    assert load_scenario(path).url == ["127.0.0.1:9000", "127.0.0.1:9001"]


def test_missing_scenario_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read scenario"):
        load_scenario(tmp_path / "nope.yaml")


def test_scenario_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "s.yaml"
    path.write_text("target: router\ncatalog: ../cat\n")
    assert load_scenario(path).catalog == (tmp_path / "cat").resolve()


def _result(lag_values_us: list[int], max_lag_ms: float = 1.0) -> dict:
    lat, lag = histogram(), histogram()
    for v in lag_values_us:
        lag.record_value(v)
        lat.record_value(1000)
    s = Scenario(target="trivial", max_lag_p99_ms=max_lag_ms)
    return RunResult(s, lat, lag, {}, len(lag_values_us), len(lag_values_us), 1.0).report()


def test_a_run_that_fell_behind_its_schedule_is_invalid():
    assert _result([100] * 1000)["valid"] is True
    bad = _result([100] * 900 + [5000] * 100)
    assert bad["valid"] is False and "scheduling lag" in bad["invalid_reason"]
    assert bad["lag_ms"]["p99"] == pytest.approx(5.0, rel=0.01)


def test_a_run_without_success_or_short_of_its_rate_is_invalid():
    lat, lag = histogram(), histogram()
    lag.record_value(100)
    s = Scenario(target="trivial", arrivals={"process": "constant", "rate": 1000, "duration_s": 1})
    none = RunResult(s, lat, lag, {"UNAVAILABLE": 1000}, 1000, 0, 1.0).report()
    assert none["valid"] is False and "no request succeeded" in none["invalid_reason"]
    for _ in range(850):
        lat.record_value(1000)
    short = RunResult(s, lat, lag, {"UNAVAILABLE": 150}, 1000, 850, 1.0).report()
    assert short["valid"] is False and "850 successful requests/s against the 1,000/s scheduled" in short["invalid_reason"]
    for _ in range(100):
        lat.record_value(1000)
    assert RunResult(s, lat, lag, {"UNAVAILABLE": 50}, 1000, 950, 1.0).report()["valid"] is True  # within 10%
    # a Poisson schedule that asked for 860 in the window: 850 is the rate reached
    assert RunResult(s, lat, lag, {}, 860, 850, 1.0, scheduled=860).report()["valid"] is True


def test_report_percentiles_come_from_the_histogram():
    r = _result([10] * 10)
    assert r["latency_ms"]["p50"] == pytest.approx(1.0, rel=0.01)
    assert r["requests"] == 10 and r["achieved_rps"] == 10.0
    assert isinstance(histogram(), HdrHistogram)
