"""The omnienc command on real data: info, embed, --help, errors without tracebacks."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from omnienc.cli import build_parser, main


@pytest.mark.parametrize("command", ["info", "embed", "probe", "masks", "segment", "pretrain"])
def test_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: omnienc " + command in capsys.readouterr().out


def test_subcommands_listed():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"info", "embed", "probe", "pretrain", "masks", "segment"} <= set(sub.choices)  # type: ignore[attr-defined]


def test_console_script_runs():
    exe = Path(sys.executable).with_name("omnienc")
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("omnienc ")


def test_info_prints_shape_spacing_orientation_modality(volumes: Path, capsys):
    path = volumes / "totalsegmentator/example_ct_sm.nii.gz"
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "122x101x30" in out and "3x3x3" in out and "RAS" in out and "CT" in out
    assert "-1100..1207" in out


def test_info_on_a_folder_prints_its_manifest(copy_real, tmp_path: Path, capsys):
    copy_real(
        "nibabel/anatomical.nii", "totalsegmentator/example_seg_mr.nii.gz", dest=tmp_path / "d"
    )
    assert main(["info", str(tmp_path / "d"), "--cache-dir", str(tmp_path / "c"), "-q"]) == 0
    captured = capsys.readouterr()
    assert "anatomical.nii" in captured.out and "label" in captured.out
    assert "2 volumes read" in captured.err


def test_info_on_a_folder_lists_image_label_pairs(copy_real, tmp_path: Path, capsys):
    copy_real(
        "pyradiomics/breast1_image.nrrd",
        "pyradiomics/breast1_label.nrrd",
        "nibabel/anatomical.nii",
        dest=tmp_path / "d",
    )
    assert main(["info", str(tmp_path / "d"), "--cache-dir", str(tmp_path / "c"), "-q"]) == 0
    out = capsys.readouterr().out
    table = out.split("label map (same folder, same grid)", 1)[1]
    assert "breast1_image.nrrd" in table and "breast1_label.nrrd" in table
    assert "anatomical.nii" not in table  # no label map on its grid


def test_info_bad_file_exits_nonzero_with_message(tmp_path: Path, capsys):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"")
    assert main(["info", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"omnienc: error: {bad}: empty file" in err
    assert "Traceback" not in err


def test_info_several_files_reports_each(volumes: Path, tmp_path: Path, capsys):
    missing = tmp_path / "missing.nii"
    assert main(["info", str(volumes / "nibabel/anatomical.nii"), str(missing)]) == 1
    out = capsys.readouterr().out
    assert "33x41x25" in out and "no such file" in out


def test_embed_random_medmnist_and_volume(volumes: Path, tmp_path: Path, capsys):
    out = tmp_path / "feats.npz"
    vol = volumes / "nibabel/anatomical.nii"
    code = main(
        [
            "embed",
            "--random",
            "resconv_tiny",
            "medmnist:adrenalmnist3d:28:val",
            str(vol),
            "-o",
            str(out),
            "-q",
            "--cache-dir",
            str(tmp_path / "c"),
        ]
    )
    assert code == 0
    with np.load(out) as z:
        feats, ids, inputs = z["features"], z["ids"], z["inputs"]
        meta = json.loads(str(z["meta"]))
        assert "labels" not in z  # the volume has no label, so no partial label column
    assert feats.shape[0] == 98 + 1 and feats.dtype == np.float32
    assert feats.shape[1] == meta["embed_dim"]
    assert np.isfinite(feats).all()
    assert ids[0] == "adrenalmnist3d:28:val:0000" and ids[-1] == str(vol)
    assert list(inputs).count("medmnist:adrenalmnist3d:28:val") == 98
    assert meta["encoder"].startswith("random:resconv_tiny")
    assert "wrote" in capsys.readouterr().out


def test_embed_labels_for_medmnist_only(tmp_path: Path):
    out = tmp_path / "f.npz"
    assert (
        main(
            [
                "embed",
                "--random",
                "resconv_tiny",
                "medmnist:adrenalmnist3d:28:val",
                "-o",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    with np.load(out) as z:
        assert z["labels"].shape == (98, 1)
        assert set(np.unique(z["labels"])) <= {0, 1}


def test_embed_is_deterministic_for_a_seed(tmp_path: Path):
    outs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.npz"
        main(
            [
                "embed",
                "--random",
                "resconv_tiny",
                "--seed",
                "3",
                "medmnist:adrenalmnist3d:28:val",
                "-o",
                str(out),
                "-q",
            ]
        )
        with np.load(out) as z:
            outs.append(z["features"])
    np.testing.assert_array_equal(*outs)


def test_embed_with_a_checkpoint(tmp_path: Path, volumes: Path):
    import torch

    from omnienc.checkpoint import save_encoder
    from omnienc.encoders import build_encoder
    from omnienc.preprocessing import Preprocessing

    torch.manual_seed(0)
    ckpt = save_encoder(
        build_encoder("resconv_tiny"),
        tmp_path / "enc",
        Preprocessing(spacing=(3.0, 3.0, 3.0)),
        meta={"step": 0},
    )
    out = tmp_path / "f.npz"
    assert (
        main(
            [
                "embed",
                str(ckpt),
                str(volumes / "totalsegmentator/example_mr_sm.nii.gz"),
                "-o",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    with np.load(out) as z:
        assert z["features"].shape[0] == 1
        assert json.loads(str(z["meta"]))["preprocessing"]["spacing"] == [3.0, 3.0, 3.0]


def test_embed_missing_checkpoint_is_a_clean_error(tmp_path: Path, capsys):
    code = main(
        [
            "embed",
            str(tmp_path / "nope"),
            "medmnist:adrenalmnist3d:28:val",
            "-o",
            str(tmp_path / "f.npz"),
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "nope") in err and "Traceback" not in err


def test_embed_missing_medmnist_file_names_it(tmp_path: Path, capsys, volumes: Path):
    root = tmp_path / "data"
    (root / "medmnist").mkdir(parents=True)
    code = main(
        [
            "embed",
            "--random",
            "resconv_tiny",
            "--data",
            str(root),
            "medmnist:breastmnist:28:test",
            "-o",
            str(tmp_path / "f.npz"),
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "breastmnist.npz" in err and str(root / "medmnist") in err


def test_embed_bad_spec_is_a_clean_error(tmp_path: Path, capsys):
    code = main(
        [
            "embed",
            "--random",
            "resconv_tiny",
            "medmnist:adrenalmnist3d:twenty:test",
            "-o",
            str(tmp_path / "f.npz"),
        ]
    )
    assert code == 1
    assert "medmnist:adrenalmnist3d:twenty:test" in capsys.readouterr().err


def test_embed_unknown_arch_is_a_clean_error(tmp_path: Path, capsys):
    code = main(
        [
            "embed",
            "--random",
            "resnet9000",
            "medmnist:adrenalmnist3d:28:val",
            "-o",
            str(tmp_path / "f.npz"),
        ]
    )
    assert code == 1
    assert "resnet9000" in capsys.readouterr().err


def test_embed_folder_skips_bad_files(copy_real, tmp_path: Path, volumes: Path):
    folder = tmp_path / "scans"
    copy_real("nibabel/anatomical.nii", "niivue/mha.mha", dest=folder)
    (folder / "bad.nii.gz").write_bytes(b"\x1f\x8b broken")
    shutil.copytree(volumes / "niivue/dicom", folder / "dicom")
    out = tmp_path / "f.npz"
    assert (
        main(
            [
                "embed",
                "--random",
                "resconv_tiny",
                str(folder),
                "-o",
                str(out),
                "-q",
                "--cache-dir",
                str(tmp_path / "c"),
            ]
        )
        == 0
    )
    with np.load(out) as z:
        assert z["features"].shape[0] == 3


def test_probe_reports_the_random_init_floor(tmp_path: Path, capsys):
    import torch

    from omnienc.checkpoint import save_encoder
    from omnienc.encoders import build_encoder
    from omnienc.preprocessing import Preprocessing

    torch.manual_seed(1)
    ckpt = save_encoder(build_encoder("resconv_tiny"), tmp_path / "enc", Preprocessing())
    out = tmp_path / "probe.json"
    assert main(["probe", str(ckpt), "--dataset", "adrenalmnist3d", "--json", str(out), "-q"]) == 0
    table = capsys.readouterr().out
    assert "random-init, same shape" in table and str(ckpt) in table
    results = json.loads(out.read_text())["results"]
    assert len(results) == 2
    for r in results.values():
        assert r["n"] == {"train": 1188, "val": 98, "test": 298}
        assert 0.0 <= r["metrics"]["auc"] <= 1.0
        lo, hi = r["intervals"]["auc"]
        assert lo <= r["metrics"]["auc"] <= hi


def test_masks_command_summarises_a_folder(copy_real, tmp_path: Path, capsys):
    copy_real(
        "totalsegmentator/example_mr_sm.nii.gz", "nibabel/anatomical.nii", dest=tmp_path / "d"
    )
    assert main(["masks", str(tmp_path / "d"), "--cache-dir", str(tmp_path / "c"), "-q"]) == 0
    out = capsys.readouterr().out
    assert "example_mr_sm.nii.gz" in out and "anatomical.nii" in out


def test_segment_command_writes_a_mask_on_the_query_grid(tmp_path: Path, volumes: Path):
    import nibabel as nib
    import torch

    from omnienc.checkpoint import save_encoder
    from omnienc.encoders import build_encoder
    from omnienc.preprocessing import Preprocessing
    from omnienc.pretext.incontext import HeadConfig, InContextHead

    torch.manual_seed(0)
    encoder = build_encoder("resconv_tiny")
    cfg = HeadConfig(dim=16, num_heads=2)
    head = InContextHead(encoder.feature_info, cfg)
    ckpt = save_encoder(
        encoder,
        tmp_path / "enc",
        Preprocessing(spacing=(6.0, 6.0, 6.0)),
        meta={"incontext_head": cfg.to_dict(), "crop_size": [32, 32, 32]},
        extra={"incontext_head": head},
    )
    t = volumes / "totalsegmentator"
    out = tmp_path / "liver.nii.gz"
    assert (
        main(
            [
                "segment",
                str(ckpt),
                "--support",
                str(t / "example_ct_sm.nii.gz"),
                str(t / "example_seg.nii.gz"),
                "--label",
                "5",
                "--query",
                str(t / "example_mr_sm.nii.gz"),
                "-o",
                str(out),
            ]
        )
        == 0
    )
    query = nib.load(t / "example_mr_sm.nii.gz")
    seg = nib.load(out)
    assert seg.shape == query.shape
    assert np.allclose(seg.affine, query.affine, atol=1e-4)


def test_segment_without_head_is_a_clean_error(tmp_path: Path, volumes: Path, capsys):
    from omnienc.checkpoint import save_encoder
    from omnienc.encoders import build_encoder
    from omnienc.preprocessing import Preprocessing

    ckpt = save_encoder(build_encoder("resconv_tiny"), tmp_path / "enc", Preprocessing())
    t = volumes / "totalsegmentator"
    code = main(
        [
            "segment",
            str(ckpt),
            "--support",
            str(t / "example_ct_sm.nii.gz"),
            str(t / "example_seg.nii.gz"),
            "--query",
            str(t / "example_ct_sm.nii.gz"),
            "-o",
            str(tmp_path / "o.nii.gz"),
        ]
    )
    assert code == 1
    assert "no in-context head" in capsys.readouterr().err


# Every argparse subcommand (pretrain, align and the bench jobs parse their own arguments).
PARSED = [
    "info",
    "embed",
    "probe",
    "masks",
    "export",
    "segment",
    "describe",
    "umap",
    "bench classification",
    "bench segmentation",
    "bench all",
    "bench medsegbench",
]
WITH_DATA = {"embed", "probe", "umap", "bench classification", "bench segmentation", "bench all"}
WITH_DATA |= {"bench medsegbench"}
WITH_CACHE = {"info", "embed", "masks", "umap", "bench classification", "bench segmentation"}
WITH_CACHE |= {"bench all"}


def _options(command: str) -> set[str]:
    parser = build_parser()
    for word in command.split():
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return {s for a in parser._actions for s in a.option_strings}


@pytest.mark.parametrize("command", PARSED)
def test_common_flags_on_every_subcommand_where_they_mean_something(command: str):
    options = _options(command)
    assert {"-q", "--quiet", "--debug"} <= options
    assert ("--data" in options) == (command in WITH_DATA)
    assert ("--cache-dir" in options) == (command in WITH_CACHE)


def test_debug_before_the_subcommand_is_kept_by_its_parser():
    segment = ["segment", "CKPT", "--support", "I", "M", "--query", "Q", "-o", "O"]
    assert build_parser().parse_args(["--debug", *segment]).debug
    args = build_parser().parse_args([*segment, "-q"])
    assert args.quiet and not args.debug
    assert build_parser().parse_args([*segment, "--debug"]).debug


def test_segment_quiet_and_debug(tmp_path: Path, volumes: Path, capsys):
    from omnienc.checkpoint import save_encoder
    from omnienc.encoders import build_encoder
    from omnienc.errors import CheckpointError
    from omnienc.preprocessing import Preprocessing

    ckpt = save_encoder(build_encoder("resconv_tiny"), tmp_path / "enc", Preprocessing())
    t = volumes / "totalsegmentator"
    image = str(t / "example_ct_sm.nii.gz")
    argv = ["segment", str(ckpt), "--support", image, str(t / "example_seg.nii.gz")]
    argv += ["--query", image, "-o", str(tmp_path / "o.nii.gz")]
    assert main([*argv, "-q"]) == 1  # accepted: the error is the checkpoint's, not the flag's
    assert "no in-context head" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="no in-context head"):
        main([*argv, "--debug"])


def test_segment_crop_size_flag(tmp_path: Path, volumes: Path, capsys):
    """--crop-size takes one int (a cube) or three; anything else is refused before any work."""
    from omnienc.checkpoint import save_encoder
    from omnienc.encoders import build_encoder
    from omnienc.preprocessing import Preprocessing

    segment = ["segment", "CKPT", "--support", "I", "M", "--query", "Q", "-o", "O"]
    assert build_parser().parse_args([*segment, "--crop-size", "96"]).crop_size == [96]
    assert build_parser().parse_args(segment).crop_size is None
    ckpt = save_encoder(build_encoder("resconv_tiny"), tmp_path / "enc", Preprocessing())
    t = volumes / "totalsegmentator"
    image = str(t / "example_ct_sm.nii.gz")
    argv = ["segment", str(ckpt), "--support", image, str(t / "example_seg.nii.gz")]
    argv += ["--query", image, "-o", str(tmp_path / "o.nii.gz")]
    for bad in (["48", "48"], ["0"]):
        with pytest.raises(SystemExit, match="--crop-size takes one or three positive ints"):
            main([*argv, "--crop-size", *bad])
    assert main([*argv, "--crop-size", "48", "-q"]) == 1  # the flag is accepted: the head is not
    assert "no in-context head" in capsys.readouterr().err
