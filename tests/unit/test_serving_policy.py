"""The routing policy: pure version choice by weight, shadow choice, validation, and the file watcher
(driven by a hand-moved clock; no sleeps)."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from recserve.errors import ConfigError
from recserve.serving.policy import (
    ModelPolicy,
    PolicyWatcher,
    RoutingPolicy,
    choose_version,
    parse_policy,
    shadow_version,
    write_policy,
)

GRID = 10_000
"""``u = i / GRID`` for i in 0..GRID-1: a uniform grid over [0, 1)."""


def policy(**models: dict) -> RoutingPolicy:
    return RoutingPolicy.model_validate({"models": models})


def split(p: RoutingPolicy, model: str = "ranker") -> Counter:
    return Counter(choose_version(p, model, i / GRID) for i in range(GRID))


class Clock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


# --- choose_version ------------------------------------------------------------------------------------------------


def test_ninety_ten_split_is_exact_on_the_grid() -> None:
    p = policy(ranker={"versions": {"1": 90, "2": 10}})
    for i in range(GRID):
        u = i / GRID
        assert choose_version(p, "ranker", u) == ("1" if u < 0.9 else "2"), u
    assert split(p) == {"1": 9000, "2": 1000}


@pytest.mark.parametrize("weights", [
    {"1": 1, "2": 1},
    {"1": 30, "2": 30, "3": 40},
    {"1": 1, "2": 2},
    {"10": 3, "2": 5, "7": 0.5},
    {"5": 0.25, "6": 0.75},
])
def test_distribution_follows_the_weights(weights: dict[str, float]) -> None:
    got = split(policy(ranker={"versions": weights}))
    total = sum(weights.values())
    assert set(got) == set(weights)
    for v, w in weights.items():
        # exact up to the grid's resolution (one grid point at each boundary)
        assert abs(got[v] - GRID * w / total) <= 1, (v, got)


def test_a_single_version_takes_everything() -> None:
    p = policy(ranker={"versions": {"3": 7}})
    assert split(p) == {"3": GRID}
    assert choose_version(p, "ranker", 0.999999999) == "3"


def test_zero_weight_version_is_never_chosen() -> None:
    for weights in ({"1": 0, "2": 100}, {"1": 100, "2": 0}, {"1": 0, "2": 1, "3": 0}, {"0": 0, "1": 1e-9, "9": 0}):
        p = policy(ranker={"versions": weights})
        got = split(p)
        zero = {v for v, w in weights.items() if w == 0}
        assert not zero & set(got), (weights, got)
        # also at the very edges of [0, 1)
        for u in (0.0, 1e-12, 0.5, 1 - 1e-12, 0.9999999999999999):
            assert choose_version(p, "ranker", u) not in zero


def test_unknown_model_gets_tritons_default_version() -> None:
    p = policy(ranker={"versions": {"1": 1}})
    assert choose_version(p, "other", 0.3) == ""
    assert choose_version(RoutingPolicy(), "ranker", 0.3) == ""


# --- shadow_version ------------------------------------------------------------------------------------------------


def test_shadow_respects_the_percentage() -> None:
    p = policy(ranker={"versions": {"1": 1}, "shadow_percent": 25, "shadow_version": "2"})
    got = [shadow_version(p, "ranker", "1", i / GRID) for i in range(GRID)]
    assert got.count("2") == GRID // 4
    assert set(got) == {"2", None}
    assert shadow_version(p, "ranker", "1", 0.2499) == "2"
    assert shadow_version(p, "ranker", "1", 0.25) is None


@pytest.mark.parametrize("percent, expected", [(0, 0), (100, GRID), (0.5, GRID // 200)])
def test_shadow_percent_bounds(percent: float, expected: int) -> None:
    p = policy(ranker={"versions": {"1": 1}, "shadow_percent": percent, "shadow_version": "2"})
    assert sum(shadow_version(p, "ranker", "1", i / GRID) == "2" for i in range(GRID)) == expected


def test_shadow_never_returns_the_serving_version() -> None:
    p = policy(ranker={"versions": {"1": 50, "2": 50}, "shadow_percent": 100, "shadow_version": "2"})
    for i in range(0, GRID, 7):
        u = i / GRID
        served = choose_version(p, "ranker", u)
        shadow = shadow_version(p, "ranker", served, u)
        assert shadow != served
        assert shadow == (None if served == "2" else "2")


def test_no_shadow_without_a_policy_or_shadow_version() -> None:
    assert shadow_version(RoutingPolicy(), "ranker", "1", 0.0) is None
    assert shadow_version(policy(ranker={"versions": {"1": 1}}), "ranker", "1", 0.0) is None
    p = policy(ranker={"versions": {"1": 1}, "shadow_percent": 100, "shadow_version": "2"})
    assert shadow_version(p, "other", "1", 0.0) is None


# --- validation ----------------------------------------------------------------------------------------------------


def test_parse_policy_reads_yaml_and_json() -> None:
    y = parse_policy("models:\n  ranker:\n    versions: {'1': 90, '2': 10}\n    shadow_percent: 5\n    shadow_version: '3'\n")
    j = parse_policy(json.dumps({"models": {"ranker": {"versions": {"1": 90, "2": 10}, "shadow_percent": 5,
                                                        "shadow_version": "3"}}}))
    assert y == j
    assert y.models["ranker"].versions == {"1": 90.0, "2": 10.0}
    assert y.models["ranker"].shadow_version == "3"
    assert parse_policy("") == RoutingPolicy()


@pytest.mark.parametrize("text, needle", [
    ("models: {ranker: {versions: {}}}", "at least one version"),
    ("models: {ranker: {}}", "versions"),
    ("models: {ranker: {versions: {'1': -1, '2': 5}}}", ">= 0"),
    ("models: {ranker: {versions: {'1': 0, '2': 0}}}", "not all 0"),
    ("models: {ranker: {versions: {'1': 1}, shadow_percent: 10}}", "shadow_version"),
    ("models: {ranker: {versions: {'1': 1}, shadow_percent: 101, shadow_version: '2'}}", "shadow_percent"),
    ("models: {ranker: {versions: {'1': 1}, shadow_percent: -1, shadow_version: '2'}}", "shadow_percent"),
    ("models: {ranker: {versions: {'1': 1}, weight: 3}}", "weight"),
    ("models: {ranker: {versions: {'1': abc}}}", "versions"),
    ("models: [ranker", "not valid YAML"),
    ("{", "not valid YAML"),
])
def test_invalid_policies_raise_config_error(text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as info:
        parse_policy(text, "policy.yaml")
    assert str(info.value).startswith("policy.yaml")


def test_yaml_policy_with_unquoted_version_numbers() -> None:
    """YAML reads `1: 90` and `shadow_version: 2` as ints; versions are names (regression: they were refused)."""
    p = parse_policy("models:\n  ranker:\n    versions:\n      1: 90\n      2: 10\n"
                     "    shadow_percent: 5\n    shadow_version: 2\n")
    assert p.models["ranker"].versions == {"1": 90.0, "2": 10.0}
    assert p.models["ranker"].shadow_version == "2"
    assert choose_version(p, "ranker", 0.95) == "2"


# --- write_policy + PolicyWatcher -------------------------------------------------------------------------------------


def test_write_policy_round_trips(tmp_path: Path) -> None:
    p = policy(ranker={"versions": {"1": 10, "2": 90}, "shadow_percent": 5, "shadow_version": "3"})
    target = tmp_path / "policy.json"
    write_policy(p, target)
    assert parse_policy(target.read_text()) == p


def test_write_policy_replaces_the_file_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "policy.json"
    write_policy(policy(ranker={"versions": {"1": 100}}), target)
    # a reader holding the old file open keeps reading the complete old policy
    old = open(target)  # noqa: SIM115
    old_inode = os.stat(target).st_ino

    replaced: list[tuple[Path, Path]] = []
    real_replace = Path.replace

    def spy(self: Path, dst):
        # at the moment of the rename the temporary file is complete and the target still the old one
        replaced.append((self, Path(dst)))
        assert parse_policy(self.read_text()) == policy(ranker={"versions": {"2": 100}})
        assert parse_policy(Path(dst).read_text()) == policy(ranker={"versions": {"1": 100}})
        return real_replace(self, dst)

    monkeypatch.setattr(Path, "replace", spy)
    write_policy(policy(ranker={"versions": {"2": 100}}), target)
    assert len(replaced) == 1 and replaced[0][1] == target and replaced[0][0] != target
    assert replaced[0][0].parent == target.parent  # same filesystem: rename is atomic
    assert os.stat(target).st_ino != old_inode
    assert parse_policy(old.read()) == policy(ranker={"versions": {"1": 100}})
    old.close()
    assert parse_policy(target.read_text()) == policy(ranker={"versions": {"2": 100}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy.json"]  # no temporary file left behind


def test_watcher_without_a_file_keeps_the_set_policy() -> None:
    w = PolicyWatcher(None, clock=Clock())
    assert w.current() == RoutingPolicy()
    p = policy(ranker={"versions": {"1": 1}})
    w.set(p)
    assert w.current() == p


def test_watcher_reloads_on_change_only_after_the_interval(tmp_path: Path) -> None:
    f = tmp_path / "policy.json"
    first, second = policy(ranker={"versions": {"1": 100, "2": 0}}), policy(ranker={"versions": {"1": 0, "2": 100}})
    write_policy(first, f)
    clock = Clock()
    w = PolicyWatcher(f, interval_s=1.0, clock=clock)
    assert w.current() == first and w.reloads == 1

    write_policy(second, f)
    clock.t += 0.5
    assert w.current() == first, "re-read before the interval passed"
    clock.t += 0.49
    assert w.current() == first
    clock.t += 0.02
    assert w.current() == second
    assert w.reloads == 2

    # unchanged file: no reload however much time passes
    for _ in range(5):
        clock.t += 10
        assert w.current() == second
    assert w.reloads == 2


def test_watcher_keeps_the_last_good_policy_on_a_broken_file(tmp_path: Path) -> None:
    f = tmp_path / "policy.yaml"
    good = policy(ranker={"versions": {"1": 100}})
    write_policy(good, f)
    clock = Clock()
    w = PolicyWatcher(f, interval_s=1.0, clock=clock)
    assert w.current() == good

    f.write_text("models: {ranker: {versions: {'1': -5}}}")  # invalid weights
    clock.t += 2
    assert w.current() == good
    f.write_text("models: [ranker")  # not YAML
    clock.t += 2
    assert w.current() == good
    f.unlink()  # gone
    clock.t += 2
    assert w.current() == good
    assert w.reloads == 1

    fixed = policy(ranker={"versions": {"2": 100}})
    write_policy(fixed, f)
    clock.t += 2
    assert w.current() == fixed
    assert w.reloads == 2


def test_watcher_starts_empty_when_the_file_is_missing(tmp_path: Path) -> None:
    clock = Clock()
    w = PolicyWatcher(tmp_path / "nope.json", clock=clock)
    assert w.current() == RoutingPolicy()
    write_policy(policy(ranker={"versions": {"1": 1}}), tmp_path / "nope.json")
    clock.t += 1.0
    assert w.current().models["ranker"].versions == {"1": 1.0}


def test_model_policy_is_importable_and_validates_directly() -> None:
    with pytest.raises(ValueError):
        ModelPolicy(versions={})
    assert ModelPolicy(versions={"1": 1}).shadow_percent == 0.0


def test_watcher_sees_a_configmap_swap_within_one_mtime_tick(tmp_path: Path) -> None:
    """A mounted ConfigMap changes by swapping the ``..data`` symlink to a new directory; the new file
    may have the same size and (on a coarse-clock filesystem) the same mtime: the inode tells."""
    first, second = policy(ranker={"versions": {"1": 100, "2": 0}}), policy(ranker={"versions": {"1": 0, "2": 100}})
    mount = tmp_path / "mount"
    mount.mkdir()

    def publish(p: RoutingPolicy, name: str) -> None:
        d = mount / name
        d.mkdir()
        write_policy(p, d / "policy.json")
        os.utime(d / "policy.json", ns=(1_000_000_000, 1_000_000_000))  # the same mtime for both
        tmp = mount / "..data_tmp"
        tmp.symlink_to(name)
        tmp.replace(mount / "..data")  # atomic swap, as the kubelet does

    publish(first, "..2026_11_23_a")
    (mount / "policy.json").symlink_to("..data/policy.json")
    clock = Clock()
    w = PolicyWatcher(mount / "policy.json", interval_s=1.0, clock=clock)
    assert w.current() == first
    publish(second, "..2026_11_23_b")
    a, b = (mount / "..2026_11_23_a" / "policy.json").stat(), (mount / "policy.json").stat()
    assert (a.st_size, a.st_mtime_ns) == (b.st_size, b.st_mtime_ns)
    clock.t += 1.0
    assert w.current() == second and w.reloads == 2
