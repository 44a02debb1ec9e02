"""The head-fit diagnostic: resolution ceiling, per-task scores, size groups, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from omnienc.benchmarks.head_fit import by_size, main, score_tasks, stride_ceiling
from omnienc.checkpoint import save_encoder
from omnienc.encoders import build_encoder
from omnienc.preprocessing import Preprocessing
from omnienc.pretext.incontext import HeadConfig, InContextHead

CONFIG = """\
data:
  roots: [volumes/pyradiomics]
  batch_size: 2
  pair: {crop_size: [32, 32, 32], max_tasks: 2}
  masks: {min_voxels: 20}
"""


def test_ceiling_keeps_stride_aligned_blocks_and_loses_single_voxels():
    target = torch.zeros(3, 16, 16, 16)
    target[0, 4:12] = 1  # a slab on cell borders (a block's corners would be rounded off)
    target[1, 5, 5, 5] = 1  # one voxel: 1/64 of its cell
    target[2, 3:9, 3:9, 3:9] = 1  # 6^3 across cell borders
    out = stride_ceiling(target, 4)
    assert torch.equal(out[0], target[0])
    assert out[1].sum() == 0
    dice = 2 * (out[2] * target[2]).sum() / (out[2].sum() + target[2].sum())
    assert 0.1 < dice < 0.5  # a 12 mm structure at 2 mm is mostly lost at stride 4
    assert torch.equal(stride_ceiling(target, 1), target)
    odd = torch.zeros(1, 10, 9, 11)
    odd[0, :5] = 1
    assert stride_ceiling(odd, 4).shape == odd.shape


class _Oracle(torch.nn.Module):
    """A 'head' that returns the query targets as logits (for scoring tests)."""

    fpn_stride = 4

    def __init__(self, targets: torch.Tensor) -> None:
        super().__init__()
        self.targets = targets

    def forward(self, ref_feats, ref_masks, query_feats, out_size):
        return self.targets * 40.0 - 20.0


def test_score_tasks_skips_empty_and_padding_tasks_and_scores_a_perfect_head():
    torch.manual_seed(0)
    encoder = build_encoder("resconv_tiny").eval()
    b, t, s = 2, 3, (32, 16, 16)
    query_masks = torch.zeros(b, t, *s)
    query_masks[0, 0, :8] = 1
    query_masks[0, 1, 2:4, 2:4, 2:4] = 1
    query_masks[1, 0, 4:12, 4:12, 4:12] = 1  # task (1, 1) empty, (1, 2) padding
    query_masks[1, 2, :16, :, :2] = 1
    valid = torch.tensor([[True, True, False], [True, True, False]])
    batch = {
        "ref_image": torch.rand(b, 1, *s),
        "query_image": torch.rand(b, 1, *s),
        "ref_masks": query_masks.clone(),
        "query_masks": query_masks,
        "task_valid": valid,
    }
    rows = score_tasks(encoder, _Oracle(query_masks), [batch])  # type: ignore[arg-type]
    assert [r["voxels"] for r in rows] == [2048.0, 8.0, 512.0]
    assert all(r["dice"] == pytest.approx(1.0) and r["volume_ratio"] == 1.0 for r in rows)
    assert all(r["soft_dice"] > 0.99 for r in rows)
    assert rows[1]["ceiling"] < 0.5 < rows[0]["ceiling"]  # 2^3 voxels vs 8 aligned planes
    table = by_size(rows, groups=2)
    assert [g["tasks"] for g in table] == [3, 2, 1]
    assert table[1]["voxels"] == [8.0, 512.0] and table[2]["voxels"] == [2048.0, 2048.0]
    with pytest.raises(ValueError, match="no non-empty task"):
        by_size([])


def test_cli_scores_a_checkpoint_on_pretraining_pairs(tmp_path: Path, data_root: Path):
    torch.manual_seed(0)
    encoder = build_encoder("resconv_tiny")
    config = HeadConfig(dim=16, num_heads=2)
    ckpt = save_encoder(
        encoder,
        tmp_path / "encoder",
        Preprocessing(spacing=(2.0, 2.0, 2.0)),
        meta={"incontext_head": config.to_dict(), "crop_size": [32, 32, 32]},
        extra={"incontext_head": InContextHead(encoder.feature_info, config)},
    )
    run = tmp_path / "run.yaml"
    run.write_text(CONFIG)
    out = tmp_path / "fit"
    argv = ["--encoder", str(ckpt), "--config", str(run), "--batches", "2", "--out", str(out)]
    argv += ["--data", str(data_root), "--data.cache_dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    payload = json.loads(out.with_suffix(".json").read_text())
    groups = payload["groups"]
    assert groups[0]["group"] == "all" and groups[0]["tasks"] == sum(g["tasks"] for g in groups[1:])
    assert 0 < groups[0]["tasks"] <= 2 * 2 * 3  # batches x pairs x (whole crop + 2 tasks)
    assert all(0.0 <= g["dice"] <= 1.0 and 0.0 <= g["ceiling"] <= 1.0 for g in groups)
    assert payload["stride"] == 4 and "head_fit" in payload["command"]
    assert "| all |" in out.with_suffix(".md").read_text()


def test_cli_names_a_checkpoint_without_a_head(tmp_path: Path, capsys):
    ckpt = save_encoder(
        build_encoder("resconv_tiny"), tmp_path / "plain", Preprocessing(spacing=(2.0, 2.0, 2.0))
    )
    with pytest.raises(SystemExit) as e:
        main(["--encoder", str(ckpt), "--config", "never-read.yaml"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "plain" in err and "no in-context head" in err
