"""The suite summary: normalised gains, aggregation across seeds, the noise rule, the tables."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from omnienc.benchmarks.summary import (
    SuiteScore,
    aggregate,
    callable_difference,
    format_summary_markdown,
    mean_normalised_gain,
    scores_from_classification,
    scores_from_pairs,
    scores_from_segmentation,
    write_summary,
)


def test_normalised_gain_analytic_cases() -> None:
    assert SuiteScore("t", "t", "AUC", 0.8, 0.6).normalised_gain == pytest.approx(0.5)
    assert SuiteScore("t", "t", "Dice", 0.0, 0.0).normalised_gain == 0.0
    assert SuiteScore("t", "t", "AUC", 0.5, 0.6).normalised_gain == pytest.approx(-0.25)
    assert SuiteScore("t", "t", "AUC", 0.7, None).normalised_gain is None
    assert SuiteScore("t", "t", "AUC", 0.9, 1.0).normalised_gain is None
    assert SuiteScore("t", "t", "AUC", 0.8, 0.6).gain == pytest.approx(0.2)


def test_mean_normalised_gain_skips_tasks_without_floor() -> None:
    scores = [
        SuiteScore("a", "a", "AUC", 0.8, 0.6),  # 0.5
        SuiteScore("b", "b", "Dice", 0.3, 0.0),  # 0.3
        SuiteScore("c", "c", "AUC", 0.9, None),
    ]
    assert mean_normalised_gain(scores) == pytest.approx(0.4)
    assert math.isnan(mean_normalised_gain([SuiteScore("c", "c", "AUC", 0.9, None)]))


def test_callable_difference_matches_the_formula() -> None:
    assert callable_difference(0.01) == pytest.approx(1.96 * 0.01 * math.sqrt(2))
    assert callable_difference(0.01, 3, 3) == pytest.approx(1.96 * 0.01 * math.sqrt(2 / 3))
    assert callable_difference(0.0) == 0.0


def _payload(encoder: str, values: tuple[float, float]) -> dict:
    scores = [
        SuiteScore("a", "task a", "AUC", values[0], 0.5),
        SuiteScore("b", "task b", "Dice", values[1], 0.0),
    ]
    from dataclasses import asdict

    return {
        "encoder": encoder,
        "plan": {"quick": True},
        "scores": [asdict(s) for s in scores],
        "mean_normalised_gain": mean_normalised_gain(scores),
        "seconds": {},
        "total_seconds": 60.0,
    }


def test_aggregate_against_numpy() -> None:
    payloads = [_payload(f"s{i}", (0.7 + 0.01 * i, 0.2 + 0.02 * i)) for i in range(3)]
    agg = aggregate(payloads)
    assert agg["n"] == 3
    assert agg["tasks"]["a"]["mean"] == pytest.approx(0.71)
    assert agg["tasks"]["b"]["sd"] == pytest.approx(np.std([0.2, 0.22, 0.24], ddof=1))
    summaries = [p["mean_normalised_gain"] for p in payloads]
    assert agg["summary"]["sd"] == pytest.approx(np.std(summaries, ddof=1))
    assert agg["callable_1v1"] == pytest.approx(callable_difference(agg["summary"]["sd"]))


def test_markdown_and_files(tmp_path) -> None:
    payloads = [_payload("s0", (0.7, 0.2)), _payload("s1", (0.72, 0.25))]
    md = format_summary_markdown(payloads, "omnienc bench summary --quick")
    assert md.count("## `s") == 2
    assert "Noise rule" in md and "mean normalised gain" in md
    json_path, md_path = write_summary(payloads, tmp_path / "summary", "cmd")
    body = json.loads(json_path.read_text())
    assert body["command"] == "cmd" and len(body["encoders"]) == 2 and "aggregate" in body
    assert md_path.read_text().startswith("# Evaluation suite summary")


def test_scores_from_classification_and_segmentation_payloads() -> None:
    row = {"method": "linear", "fraction": 1.0, "metrics": {"auc": 0.8}}
    payload = {
        "dataset": "adrenalmnist3d",
        "size": 28,
        "rows": [
            {**row, "encoder": "pretrained"},
            {**row, "encoder": "random-init", "metrics": {"auc": 0.7}},
            {**row, "encoder": "pretrained", "fraction": 0.1, "metrics": {"auc": 0.1}},
        ],
    }
    (s,) = scores_from_classification(payload)
    assert (s.task, s.value, s.floor) == ("adrenalmnist3d_28_linear_auc", 0.8, 0.7)
    seg = {
        "benchmarks": [
            {"summary": {"frozen": {"mean": {"mean": 0.2}}}},
            {"summary": {"frozen": {"mean": {"mean": 0.0}}}},
        ]
    }
    (d,) = scores_from_segmentation(seg)
    assert (d.value, d.floor) == (0.2, 0.0)
    pairs = scores_from_pairs({"x_dice": 0.4, "x_dice_floor": 0.1, "y_auc": 0.9}, {"x_dice": "x"})
    assert [(p.task, p.metric, p.floor) for p in pairs] == [("x_dice", "Dice", 0.1)]


def test_compare_applies_the_noise_rule() -> None:
    from omnienc.benchmarks.summary import compare

    seeds = [_payload(f"s{i}", (0.7 + 0.01 * i, 0.2)) for i in range(3)]
    agg = aggregate(seeds)
    bar = callable_difference(agg["summary"]["sd"], 1, 3)
    far = _payload("other", (0.9, 0.5))
    near = _payload("near", (0.71, 0.2))
    assert compare(far, seeds)["verdict"] == "ahead"
    assert compare(near, seeds)["verdict"] == "level within seed noise"
    assert compare(near, seeds)["callable"] == pytest.approx(bar)
    md = format_summary_markdown(seeds, "cmd", [far])
    assert "against the mean of these 3" in md and "| ahead |" in md


def test_compare_uses_the_tasks_both_sides_have() -> None:
    """An encoder without some task (a head-less peer) is compared over the shared tasks."""
    from dataclasses import asdict

    from omnienc.benchmarks.summary import compare

    seeds = [_payload(f"s{i}", (0.7 + 0.01 * i, 0.9)) for i in range(3)]
    peer = _payload("peer", (0.8, 0.0))
    peer["scores"] = [asdict(SuiteScore("a", "task a", "AUC", 0.8, 0.5))]
    peer["mean_normalised_gain"] = 0.6  # over its one task
    c = compare(peer, seeds)
    assert c["tasks"] == 1 and c["left_out"] == ["b"]
    gains_a = [(0.7 + 0.01 * i - 0.5) / 0.5 for i in range(3)]
    assert c["seeds_mean"] == pytest.approx(np.mean(gains_a))
    assert c["difference"] == pytest.approx(0.6 - np.mean(gains_a))
    assert c["callable"] == pytest.approx(callable_difference(np.std(gains_a, ddof=1), 1, 3))
    assert c["verdict"] == "ahead"
    # Over all tasks the seeds (task b at 0.9) would have been ahead of it instead.
    assert seeds[0]["mean_normalised_gain"] > peer["mean_normalised_gain"]
    md = format_summary_markdown(seeds, "cmd", [peer])
    assert "| `peer` | 1 | 0.600 |" in md and "| b |" in md
    # Same task sets: the plain summary.
    same = compare(seeds[0], seeds)
    assert same["tasks"] == 2 and same["left_out"] == []
    assert same["value"] == pytest.approx(seeds[0]["mean_normalised_gain"])
    none = _payload("none", (0.8, 0.1))
    none["scores"] = [asdict(SuiteScore("z", "task z", "AUC", 0.8, 0.5))]
    with pytest.raises(ValueError, match="shares no scored task"):
        compare(none, seeds)


def test_compare_warns_when_few_shot_windows_differ() -> None:
    """Few-shot cells scored with another window (or an unrecorded one) are named, not mixed."""
    from dataclasses import asdict

    from omnienc.benchmarks.fewshot_windows import fewshot_window_of
    from omnienc.benchmarks.summary import compare

    def with_fewshot(
        name: str, window: list[int] | None, spacing: tuple[float, ...] | None = (2.0, 2.0, 2.0)
    ) -> dict:
        p = _payload(name, (0.75, 0.2))
        p["scores"].append(asdict(SuiteScore("fewshot_head_ct", "head CT", "Dice", 0.1, 0.0)))
        if window is not None:
            p["fewshot_window"] = window
            p["fewshot_spacing"] = None if spacing is None else list(spacing)
        return p

    seeds = [with_fewshot(f"s{i}", [96, 96, 96]) for i in range(2)]
    assert fewshot_window_of(seeds[0]) == "192x192x192 mm"
    assert compare(with_fewshot("same", [96, 96, 96]), seeds)["warning"] is None
    # A 4 mm encoder with 48^3 windows looks at the same 192 mm: scored alike.
    coarse = with_fewshot("coarse", [48, 48, 48], spacing=(4.0, 4.0, 4.0))
    assert compare(coarse, seeds)["warning"] is None
    old = compare(with_fewshot("old", None), seeds)
    assert old["warning"] == (
        "few-shot windows differ (192x192x192 mm; not recorded (before 2026-12-07: the "
        "pretraining crop)): the few-shot cells of old and the seeds were not scored alike"
    )
    native = with_fewshot("native", [32, 32, 32], spacing=None)
    assert fewshot_window_of(native) == "32x32x32 voxels"
    assert "32x32x32 voxels" in compare(native, seeds)["warning"]
    md = format_summary_markdown(seeds, "cmd", [with_fewshot("old", None), native])
    assert "\n\nWarning: few-shot windows differ" in md and md.count("Warning:") == 2
    mixed = format_summary_markdown([seeds[0], with_fewshot("old", None)], "cmd")
    assert "Warning: these encoders' few-shot windows differ" in mixed
    assert "Warning" not in format_summary_markdown(seeds, "cmd")
    # Without few-shot tasks in common the windows do not matter.
    assert compare(_payload("peer", (0.8, 0.2)), seeds)["warning"] is None


def test_summary_cli_reuses_earlier_results_files(tmp_path, capsys) -> None:
    """`bench summary` entries ending in .json are earlier results: nothing is run again."""
    from omnienc.benchmarks.suite import main

    seeds = [_payload(f"s{i}", (0.7 + 0.01 * i, 0.2)) for i in range(3)]
    write_summary(seeds, tmp_path / "seeds", "cmd")
    write_summary([_payload("other", (0.9, 0.5))], tmp_path / "other", "cmd")
    out = tmp_path / "joined"
    argv = ["--encoder", str(tmp_path / "seeds.json"), "--compare", str(tmp_path / "other.json")]
    assert main([*argv, "--quick", "--out", str(out)]) == 0
    body = json.loads(out.with_suffix(".json").read_text())
    assert [p["encoder"] for p in body["encoders"]] == ["s0", "s1", "s2"]
    assert body["compared"][0]["encoder"] == "other" and body["compared"][0]["verdict"] == "ahead"
    assert "seeds.json" in body["command"] and "| `other` | 2 |" in capsys.readouterr().out
    # A full-mode summary cannot take quick-mode results, nor a file that is not one.
    with pytest.raises(SystemExit) as e:
        main([*argv, "--out", str(out)])
    assert e.value.code == 2
    assert "scored in quick mode, this summary is full" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--encoder", str(tmp_path / "missing.json"), "--quick", "--out", str(out)])
    assert "missing.json" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit):
        main(["--encoder", str(tmp_path / "bad.json"), "--quick", "--out", str(out)])
    assert "bad.json" in capsys.readouterr().err


def test_one_run_is_judged_with_a_given_seed_sd(tmp_path, capsys) -> None:
    """One --encoder run has no SD of its own: no verdict without --seed-sd, the rule with it."""
    from omnienc.benchmarks.suite import main
    from omnienc.benchmarks.summary import compare

    mine, other = _payload("mine", (0.7, 0.2)), _payload("other", (0.9, 0.5))
    with pytest.raises(ValueError, match="give seed_sd"):
        compare(other, [mine])
    c = compare(other, [mine], seed_sd=0.05)
    diff = other["mean_normalised_gain"] - mine["mean_normalised_gain"]
    assert c["difference"] == pytest.approx(diff) and c["seed_sd"] == 0.05
    assert c["callable"] == pytest.approx(callable_difference(0.05, 1, 1))
    assert c["verdict"] == ("ahead" if diff > c["callable"] else "level within seed noise")
    assert compare(other, [mine], seed_sd=1.0)["verdict"] == "level within seed noise"
    # The command line: earlier results of one run each.
    write_summary([mine], tmp_path / "mine", "cmd")
    write_summary([other], tmp_path / "other", "cmd")
    argv = ["--encoder", str(tmp_path / "mine.json"), "--compare", str(tmp_path / "other.json")]
    out = tmp_path / "joined"
    assert main([*argv, "--quick", "--out", str(out)]) == 0
    assert "No verdict" in capsys.readouterr().out
    assert "compared" not in json.loads(out.with_suffix(".json").read_text())
    assert main([*argv, "--quick", "--seed-sd", "0.05", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "seed SD 0.050, given" in text and f"| {c['verdict']} |" in text
    body = json.loads(out.with_suffix(".json").read_text())
    assert body["compared"][0]["callable"] == pytest.approx(c["callable"])
    for bad in ("0", "-1", "nan"):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--quick", "--seed-sd", bad, "--out", str(out)])
        assert e.value.code == 2
        assert "--seed-sd must be positive" in capsys.readouterr().err


def test_write_summary_judges_each_other_encoder_once(tmp_path, monkeypatch) -> None:
    """The JSON body and the markdown share one comparison per other encoder, not two."""
    from omnienc.benchmarks import summary

    calls: list[str] = []
    real = summary.compare

    def counting(payload, seeds, seed_sd=None):
        calls.append(payload["encoder"])
        return real(payload, seeds, seed_sd)

    monkeypatch.setattr(summary, "compare", counting)
    seeds = [_payload(f"s{i}", (0.7 + 0.01 * i, 0.2)) for i in range(3)]
    others = [_payload("a", (0.9, 0.5)), _payload("b", (0.7, 0.21))]
    json_path, md_path = write_summary(seeds, tmp_path / "s", "cmd", others)
    assert calls == ["a", "b"]
    body = json.loads(json_path.read_text())
    for c in body["compared"]:
        assert f"| `{c['encoder']}` | {c['tasks']} | {c['value']:.3f} |" in md_path.read_text()


def test_bench_all_summary_records_the_few_shot_window() -> None:
    """The suite payload of bench all's results carries the window its few-shot run used."""
    from pathlib import Path

    from omnienc.benchmarks.suite import summary_of_bench_all

    path = Path(__file__).parents[1] / "benchmarks/results/bench/fewshot.json"
    fewshot = json.loads(path.read_text())
    payload = summary_of_bench_all("ckpt", [], None, fewshot, None, None, 1.0)
    assert payload["fewshot_window"] == fewshot["settings"]["crop_size"]
    assert payload["fewshot_spacing"] == fewshot["settings"].get("spacing")
    assert any(s["task"].startswith("fewshot_head") for s in payload["scores"])
    none = summary_of_bench_all("ckpt", [], None, None, None, None, 1.0)
    assert none["fewshot_window"] is None and none["fewshot_spacing"] is None
