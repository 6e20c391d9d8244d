"""The demo data builder: shipped files match it; the length-biased variant carries its bias."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from demo.build import build_data, build_length_biased_data, word_count
from demo.judge import sentiment_judge

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo" / "data"
BIASED = ROOT / "demo" / "data-length-biased"
VARIANT_FILES = {"preferences": 3000, "preference_labels": 9000, "eval_pairs": 400}


def _rows(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _longer_share(pairs: list[dict]) -> float:
    return sum(word_count(p["chosen"]) > word_count(p["rejected"]) for p in pairs) / len(pairs)


def _gold_agreement(pairs: list[dict]) -> float:
    gc = sentiment_judge([p["chosen"] for p in pairs])
    gr = sentiment_judge([p["rejected"] for p in pairs])
    return sum(c > r for c, r in zip(gc, gr)) / len(pairs)


@pytest.mark.parametrize("name,rows", sorted(VARIANT_FILES.items()))
def test_variant_files_exist_parse_and_stay_small(name, rows):
    path = BIASED / f"{name}.jsonl"
    assert path.stat().st_size < 2_000_000
    data, normal = _rows(path), _rows(DEMO / f"{name}.jsonl")
    assert len(data) == rows == len(normal)
    assert all(set(r) == set(normal[0]) for r in data)  # the normal demo's format


def test_variant_shares_the_prompt_split():
    train = {r["prompt"] for r in _rows(DEMO / "rl_prompts.jsonl")}
    held_out = {r["prompt"] for r in _rows(DEMO / "eval_prompts.jsonl")}
    assert {p["prompt"] for p in _rows(BIASED / "preferences.jsonl")} <= train
    assert {p["prompt"] for p in _rows(BIASED / "eval_pairs.jsonl")} <= held_out


def test_variant_prefers_longer_and_normal_demo_follows_gold():
    biased, normal = _rows(BIASED / "preferences.jsonl"), _rows(DEMO / "preferences.jsonl")
    assert _longer_share(biased) > 0.9  # 0.964 shipped
    assert _longer_share(_rows(BIASED / "eval_pairs.jsonl")) > 0.9  # 0.980
    assert 0.35 < _longer_share(normal) < 0.6  # 0.458: no length bias in the normal demo
    gold_biased, gold_normal = _gold_agreement(biased), _gold_agreement(normal)
    assert gold_normal > 0.8  # 0.883
    assert gold_biased < 0.6  # 0.481: the labels say nothing about quality
    assert gold_normal - gold_biased > 0.25


def test_shipped_data_match_the_builder(tmp_path):
    build_data(tmp_path / "demo", seed=0)
    for path in sorted(DEMO.glob("*.jsonl")):
        assert (tmp_path / "demo" / path.name).read_bytes() == path.read_bytes(), path.name
    build_length_biased_data(tmp_path / "biased", seed=0)
    for name in VARIANT_FILES:
        built = (tmp_path / "biased" / f"{name}.jsonl").read_bytes()
        assert built == (BIASED / f"{name}.jsonl").read_bytes(), name
