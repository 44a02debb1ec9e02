"""Language adapter: projector shapes, loss masking, frozen-LM gradients, export round trip,
``omnienc align`` / ``omnienc describe`` end to end, templated and CSV paired data, and the
benchmark's metrics. The LM is ``lm/fake_gpt2`` (random weights, width 2): plumbing, not
language."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from omnienc import cli
from omnienc.adapters.language import (
    PROJECTORS,
    TERM_ORDER,
    AlignConfig,
    LabelledVolume,
    PairedDataConfig,
    PairedVolumes,
    ProjectorConfig,
    TokenSet,
    VisionLanguageModel,
    adrenal_items,
    align,
    build_projector,
    collate_tokens,
    crop_items,
    crop_report,
    encode_tokens,
    grid_starts,
    load_causal_lm,
    load_projector,
    load_vision_language,
    parse_adrenal_report,
    parse_crop_report,
    report_term,
    save_projector,
    state_fingerprint,
)
from omnienc.benchmarks.language_lm import TextLMConfig, train_text_lm
from omnienc.benchmarks.language_scores import (
    adrenal_scores,
    calibrated,
    crop_scores,
    retrieval_hits,
    shuffled_rows,
)
from omnienc.data.labeled import read_label_map
from omnienc.data.labelnames import TOTALSEG_MR
from omnienc.encoders import build_encoder
from omnienc.errors import CheckpointError, DataError
from omnienc.preprocessing import Preprocessing

MR = "totalsegmentator/example_mr_sm.nii.gz"  # (117, 91, 20) at 3 mm
MR_SEG = "totalsegmentator/example_seg_mr.nii.gz"
CT = "totalsegmentator/example_ct_sm.nii.gz"
TEXTS = [
    "CT of the abdomen. Structures: liver, spleen.",
    "AdrenalMNIST3D adrenal shape mask: normal.",
    "MR of the abdomen. Structures: none.",
]


@pytest.fixture(scope="module")
def fake_lm_dir(data_root: Path) -> Path:
    return data_root / "lm" / "fake_gpt2"


@pytest.fixture(scope="module")
def fake_lm(fake_lm_dir: Path):
    return load_causal_lm(fake_lm_dir)


def _model(fake_lm, kind: str = "resampler", in_dim: int = 16) -> VisionLanguageModel:
    lm, tokenizer = fake_lm
    torch.manual_seed(0)
    config = ProjectorConfig(kind=kind, num_prefix=4, width=16, num_heads=2)
    projector = build_projector(config, in_dim, lm.get_input_embeddings().embedding_dim)
    return VisionLanguageModel(projector, lm, tokenizer)


def _tokens(b: int = 3, n: int = 6, e: int = 16) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, n // 2 :] = False  # item 1 has fewer tokens
    return {"tokens": torch.randn(b, n, e), "mask": mask, "positions": torch.rand(b, n, 3) * 2 - 1}


# ----------------------------------------------------------------------------------- projectors


@pytest.mark.parametrize("kind", sorted(PROJECTORS))
def test_projector_maps_tokens_to_prefix_and_ignores_padding(kind: str):
    torch.manual_seed(0)
    proj = build_projector(ProjectorConfig(kind=kind, num_prefix=5, width=32), 16, 24).eval()
    t = _tokens()
    out = proj(t["tokens"], t["mask"], t["positions"])
    assert out.shape == (3, 5, 24) and torch.isfinite(out).all()
    # Padded tokens (mask False) must not change anything.
    noisy = t["tokens"].clone()
    noisy[~t["mask"]] = 1e3
    assert torch.allclose(proj(noisy, t["mask"], t["positions"]), out, atol=1e-5)
    # Any number of tokens: one item alone, without its padding, gives the same prefix.
    k = int(t["mask"][1].sum())
    alone = proj(t["tokens"][1:2, :k], None, t["positions"][1:2, :k])
    assert torch.allclose(alone, out[1:2], atol=1e-5)


@pytest.mark.parametrize("kind", sorted(PROJECTORS))
def test_projector_standardises_inputs_with_training_statistics(kind: str):
    torch.manual_seed(0)
    proj = build_projector(ProjectorConfig(kind=kind, num_prefix=2, width=16), 4, 3)
    # Items that differ by 1% of the feature scale, as pooled encoder features can.
    items = [
        torch.full((5, 4), 10.0) + 0.1 * torch.randn(1, 4) + torch.randn(5, 4) for _ in range(20)
    ]
    proj.fit_input_stats(items)
    tokens, pooled = proj.standardise(torch.stack(items), None)
    assert torch.allclose(pooled.mean(0), torch.zeros(4), atol=1e-4)
    assert torch.allclose(pooled.std(0, unbiased=False), torch.ones(4), atol=1e-4)
    assert torch.allclose(tokens.flatten(0, 1).mean(0), torch.zeros(4), atol=1e-4)
    state = proj.state_dict()  # exported with the weights
    assert {"token_mean", "token_std", "pooled_mean", "pooled_std"} <= set(state)


def test_projector_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown projector kind"):
        ProjectorConfig(kind="qformer")
    with pytest.raises(ValueError, match="must divide"):
        ProjectorConfig(width=30, num_heads=4)


# ------------------------------------------------------------------------- LM plumbing, masking


def test_labels_mask_prefix_prompt_and_padding(fake_lm):
    model = _model(fake_lm)
    prefix = torch.zeros(3, 4, 2)
    batch = model.build_inputs(prefix, TEXTS)
    s = batch["text_start"]
    assert s == 4 + len(model.prompt_ids)  # prefix + bos + prompt
    labels = batch["labels"]
    assert (labels[:, :s] == -100).all()
    for row, ids in enumerate(model.text_ids(TEXTS)):
        assert labels[row, s : s + len(ids)].tolist() == ids
        assert (labels[row, s + len(ids) :] == -100).all()
        assert batch["attention_mask"][row].sum() == s + len(ids)
    assert batch["inputs_embeds"].shape == (3, labels.shape[1], 2)


def test_loss_is_the_lm_loss_on_text_tokens_only(fake_lm):
    """Against the LM's own loss, row by row, with -100 everywhere but the text tokens."""
    lm, _ = fake_lm
    model = _model(fake_lm)
    t = _tokens()
    prefix = model.prefix(t["tokens"], t["mask"], t["positions"])
    loss = model.loss(prefix, TEXTS)
    total, count = 0.0, 0
    for i, text in enumerate(TEXTS):
        one = model.build_inputs(prefix[i : i + 1], [text])
        ref = lm(inputs_embeds=one["inputs_embeds"], labels=one["labels"]).loss
        n = int((one["labels"] != -100).sum())
        total, count = total + float(ref.detach()) * n, count + n
    assert float(loss.detach()) == pytest.approx(total / count, rel=1e-5)
    # Summed log-probabilities of each text agree with the mean loss.
    seq = model.sequence_logprob(prefix, TEXTS)
    n_tokens = sum(len(i) for i in model.text_ids(TEXTS))
    assert float(-seq.sum() / n_tokens) == pytest.approx(float(loss), rel=1e-5)


def test_loss_ignores_what_the_prompt_positions_would_predict(fake_lm):
    """Changing the prompt text changes the inputs but no prompt token is ever a target."""
    model = _model(fake_lm)
    prefix = torch.zeros(1, 4, 2)
    a = model.build_inputs(prefix, TEXTS[:1])
    model.prompt_ids = model.prompt_ids + model.prompt_ids[1:]  # a longer prompt
    b = model.build_inputs(prefix, TEXTS[:1])
    assert (a["labels"] != -100).sum() == (b["labels"] != -100).sum()
    assert a["labels"][a["labels"] != -100].tolist() == b["labels"][b["labels"] != -100].tolist()


def test_gradients_reach_only_the_projector(fake_lm):
    lm, _ = fake_lm
    model = _model(fake_lm, kind="resampler")
    lm_before = copy.deepcopy(lm.state_dict())
    model.train()
    assert not model.lm.training and model.projector.training  # the LM stays in eval mode
    t = _tokens()
    model.loss(model.prefix(t["tokens"], t["mask"], t["positions"]), TEXTS).backward()
    for name, p in model.projector.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(not p.requires_grad and p.grad is None for p in model.lm.parameters())
    torch.optim.SGD(model.projector.parameters(), lr=1.0).step()
    for k, v in model.lm.state_dict().items():
        assert torch.equal(v, lm_before[k]), k


def test_generate_is_greedy_decoding_after_prefix_and_prompt(fake_lm):
    """Against a naive greedy loop that re-runs the LM on the whole sequence at every step."""
    lm, tokenizer = fake_lm
    model = _model(fake_lm)
    torch.manual_seed(3)
    prefix = torch.randn(2, 4, 2)
    texts = model.generate(prefix, max_new_tokens=3)
    embed = lm.get_input_embeddings()
    for row in range(2):
        seq = torch.cat([prefix[row : row + 1], embed(torch.tensor([model.prompt_ids]))], dim=1)
        ids: list[int] = []
        with torch.no_grad():
            for _ in range(3):
                nxt = int(lm(inputs_embeds=seq).logits[0, -1].argmax())
                if nxt == model.eos_id:
                    break
                ids.append(nxt)
                seq = torch.cat([seq, embed(torch.tensor([[nxt]]))], dim=1)
        expected = tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        assert texts[row] == expected.strip()


def test_projector_width_must_match_the_lm(fake_lm):
    lm, tokenizer = fake_lm
    projector = build_projector(ProjectorConfig(kind="mlp"), 16, 7)
    with pytest.raises(ValueError, match="hidden size is 2"):
        VisionLanguageModel(projector, lm, tokenizer)


# --------------------------------------------------------------------------------- tokens


def test_encode_tokens_batches_same_shapes_and_keeps_order():
    torch.manual_seed(0)
    encoder = build_encoder("resconv_tiny").eval()
    shapes = [(1, 32, 32, 32), (1, 32, 32, 32), (1, 48, 32, 32), (1, 32, 32, 32)]
    items = [
        {"image": torch.randn(s), "text": f"t{i}", "id": f"i{i}", "meta": {"k": i}}
        for i, s in enumerate(shapes)
    ]
    tokens = encode_tokens(encoder, items, batch_size=2)
    assert tokens.texts == ["t0", "t1", "t2", "t3"] and [m["k"] for m in tokens.metas] == [
        0,
        1,
        2,
        3,
    ]
    assert [tuple(t.shape) for t in tokens.tokens] == [(8, 64), (8, 64), (12, 64), (8, 64)]
    with torch.no_grad():
        ref = encoder.forward_features(items[2]["image"][None])[0]  # (64, 3, 2, 2)
    assert torch.allclose(tokens.tokens[2], ref.flatten(1).T, atol=1e-5)
    assert tokens.positions[2].shape == (12, 3) and tokens.positions[2].abs().max() < 1
    batch = collate_tokens([tokens[i] for i in range(4)])
    assert batch["tokens"].shape == (4, 12, 64) and batch["mask"].sum(1).tolist() == [8, 8, 12, 8]


def test_state_fingerprint_follows_weights():
    torch.manual_seed(0)
    a = build_encoder("resconv_tiny")
    b = copy.deepcopy(a)
    assert state_fingerprint(a) == state_fingerprint(b)
    with torch.no_grad():
        next(b.parameters()).add_(1e-3)
    assert state_fingerprint(a) != state_fingerprint(b)


# ------------------------------------------------------------------------------ export, load


def test_projector_round_trip_is_safetensors_and_json(fake_lm, tmp_path: Path):
    model = _model(fake_lm, kind="mlp")
    folder = save_projector(model, tmp_path / "projector", {"encoder": {}, "lm": {}, "meta": {}})
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "projector.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["projector"]["kind"] == "mlp" and config["out_dim"] == 2
    loaded, _ = load_projector(folder)
    t = _tokens()
    with torch.no_grad():
        assert torch.equal(
            loaded(t["tokens"], t["mask"], t["positions"]),
            model.projector.eval()(t["tokens"], t["mask"], t["positions"]),
        )
    data = bytearray((folder / "projector.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "projector.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_projector(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        load_projector(folder)


@pytest.fixture(scope="module")
def aligned_run(fake_lm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two alignment steps: a random-init resconv_tiny, fake_gpt2, 8 AdrenalMNIST3D items."""
    run_dir = tmp_path_factory.mktemp("align")
    config = AlignConfig(
        encoder="random:resconv_tiny:0",
        lm=str(fake_lm_dir),
        projector=ProjectorConfig(kind="resampler", num_prefix=2, width=16, num_heads=2),
        data=PairedDataConfig(sources=["adrenalmnist3d"], max_items=8),
        batch_size=4,
        trainer={"max_steps": 2, "accelerator": "cpu"},
        run_dir=str(run_dir),
    )
    align(config, progress=False)
    return run_dir


@pytest.fixture(scope="module")
def real_crop(volumes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 66 x 66 x 33 mm crop of the real abdominal CT, as a NIfTI file."""
    img = nib.load(volumes / CT)
    out = tmp_path_factory.mktemp("crop") / "crop.nii.gz"
    nib.save(img.slicer[50:72, 40:62, 10:21], out)
    return out


def test_align_trains_on_a_users_csv_of_whole_volumes(fake_lm_dir: Path, copy_real, tmp_path: Path):
    """Volumes of different sizes give different token counts; batches pad and mask them."""
    mr, ct = copy_real(MR, CT, dest=tmp_path / "vols")
    csv_path = tmp_path / "reports.csv"
    csv_path.write_text(
        f"path,report\nvols/{mr.name},MR of the upper abdomen.\nvols/{ct.name},CT abdomen.\n"
    )
    config = AlignConfig(
        encoder="random:resconv_tiny:0",
        lm=str(fake_lm_dir),
        projector=ProjectorConfig(kind="resampler", num_prefix=2, width=16, num_heads=2),
        data=PairedDataConfig(sources=[str(csv_path)]),
        batch_size=2,
        trainer={"max_steps": 1, "accelerator": "cpu"},
        run_dir=str(tmp_path / "run"),
    )
    folder = align(config, progress=False)
    meta = json.loads((folder / "config.json").read_text())["meta"]
    assert meta["templated"] is False and meta["items"] == {"csv": 2}


def test_align_exports_encoder_and_projector(aligned_run: Path, fake_lm_dir: Path):
    config = json.loads((aligned_run / "projector" / "config.json").read_text())
    assert config["meta"]["templated"] is True and config["meta"]["items"] == {"adrenalmnist3d": 8}
    assert config["encoder"]["source"] == "random:resconv_tiny:0"
    assert (aligned_run / "encoder" / "model.safetensors").is_file()
    model, encoder, _, _ = load_vision_language(aligned_run / "encoder", fake_lm_dir)
    assert state_fingerprint(encoder) == config["encoder"]["fingerprint"]
    assert not any(p.requires_grad for p in model.lm.parameters())


def test_describe_cli_end_to_end(aligned_run: Path, fake_lm_dir: Path, real_crop: Path, capsys):
    argv = ["describe", str(aligned_run / "encoder"), str(real_crop), "--lm", str(fake_lm_dir)]
    assert cli.main([*argv, "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() and "templated" in out.err


def test_describe_errors_name_the_folder_and_problem(
    aligned_run: Path, fake_lm_dir: Path, real_crop: Path, tmp_path: Path, capsys
):
    enc = str(aligned_run / "encoder")
    cases = [
        ([enc, str(real_crop), "--lm", str(tmp_path / "nolm")], "nolm: language model folder "),
        ([enc, str(real_crop), "--lm", str(tmp_path)], "config.json is missing"),
        (
            [
                "random:resconv_tiny:1",
                str(real_crop),
                "--lm",
                str(fake_lm_dir),
                "--projector",
                str(aligned_run / "projector"),
            ],
            "is not the one projector",
        ),
        (
            [enc, str(real_crop), "--lm", str(fake_lm_dir), "--projector", str(tmp_path / "p")],
            "projector folder does not exist",
        ),
    ]
    for argv, message in cases:
        assert cli.main(["describe", *argv]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_describe_refuses_another_lm(
    aligned_run: Path, fake_lm: tuple, real_crop: Path, tmp_path: Path, capsys
):
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tokenizer = fake_lm
    for width, message in ((4, "hidden size 4 differs"), (2, "not the ones projector")):
        torch.manual_seed(0)
        other = tmp_path / f"lm{width}"
        GPT2LMHeadModel(GPT2Config(n_embd=width, n_layer=1, n_head=1)).save_pretrained(other)
        tokenizer.save_pretrained(other)
        argv = ["describe", str(aligned_run / "encoder"), str(real_crop), "--lm", str(other)]
        assert cli.main(argv) == 1
        assert message in capsys.readouterr().err


def test_align_cli_parses_config_and_refuses_unknown_keys(fake_lm_dir: Path, tmp_path: Path):
    repo = Path(__file__).resolve().parents[1]
    base = [
        "align",
        "--config",
        str(repo / "configs" / "align" / "quick.yaml"),
        f"--lm={fake_lm_dir}",
        "--encoder=random:resconv_tiny",
        "--data.sources=[adrenalmnist3d]",
        "--data.max_items=4",
        "--trainer.max_steps=1",
        "--trainer.enable_progress_bar=false",
        f"--run_dir={tmp_path / 'run'}",
    ]
    assert cli.main([*base, "--projector.bogus=1"]) == 2
    assert cli.main(base) == 0
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert (tmp_path / "run" / "projector" / "projector.safetensors").is_file()


# ------------------------------------------------------------------------ paired data, CSV


def test_templated_terms_and_reports_round_trip():
    assert [report_term(n) for n in ("kidney_left", "vertebrae_L1", "lung_left", "rib_left_7")] == [
        "kidney",
        "spine",
        "lung",
        None,
    ]
    text = crop_report("CT", "abdomen", ["liver", "adrenal gland", "kidney"])
    assert text == "CT of the abdomen. Structures: liver, adrenal gland, kidney."
    assert parse_crop_report(text) == {
        "modality": "CT",
        "region": "abdomen",
        "structures": {"liver", "adrenal gland", "kidney"},
    }
    assert parse_crop_report("MR of the chest. Structures: none.")["structures"] == set()
    assert parse_crop_report("gibberish")["modality"] is None
    names = ["normal", "hyperplasia"]
    assert parse_adrenal_report("AdrenalMNIST3D adrenal shape mask: hyperplasia.", names) == (
        "hyperplasia"
    )
    assert parse_adrenal_report("AdrenalMNIST3D adrenal shape mask: maybe.", names) is None
    assert grid_starts(10, 4, 4) == [0, 4, 6] and grid_starts(3, 4, 4) == [0]


def test_crop_items_name_the_structures_of_the_real_label_map(volumes: Path):
    pre = Preprocessing(spacing=(4.0, 4.0, 4.0))
    vol = LabelledVolume(MR, MR_SEG, "abdomen")
    items = crop_items(vol, volumes, pre, (16, 16, 16), stride=16, min_voxels=20)
    assert items and all(i.image.shape == (1, 16, 16, 16) for i in items)
    assert all(i.meta["templated"] and i.text.startswith("MR of the abdomen.") for i in items)
    # A naive recount of one crop from the preprocessed label map.
    from omnienc.data.labeled import LabeledVolumes

    label = LabeledVolumes([(volumes / MR, volumes / MR_SEG)], pre)[0]["label"][0]
    pads = [max(0, 16 - s) for s in label.shape]
    label = torch.nn.functional.pad(
        label, [p for s in reversed(pads) for p in (s // 2, s - s // 2)]
    )
    named = [i for i in items if i.meta["structures"]]
    item = named[len(named) // 2]
    x, y, z = item.meta["start"]
    crop = label[x : x + 16, y : y + 16, z : z + 16]
    counts: dict[str, int] = {}
    for i, name in TOTALSEG_MR.items():
        term = report_term(name)
        if term:
            counts[term] = counts.get(term, 0) + int((crop == i).sum())
    expected = [t for t in TERM_ORDER if counts.get(t, 0) >= 20]
    assert item.meta["structures"] == expected
    assert item.text == crop_report("MR", "abdomen", expected)
    assert read_label_map(volumes / MR_SEG).array.max() <= max(TOTALSEG_MR)


def test_adrenal_items_use_the_medmnist_class_names(data_root: Path):
    items = adrenal_items("test", 28, data_root / "medmnist", limit=40)
    assert len(items) == 40 and items[0].image.shape == (1, 28, 28, 28)
    texts = {i.meta["class"]: i.text for i in items}
    assert texts["normal"] == "AdrenalMNIST3D adrenal shape mask: normal."
    assert all(i.meta["templated"] for i in items)


def test_csv_dataset_reads_pairs(copy_real, tmp_path: Path):
    (mr,) = copy_real(MR, dest=tmp_path / "vols")
    csv_path = tmp_path / "reports.csv"
    csv_path.write_text(f'path,report\nvols/{mr.name},"MR of the abdomen, liver visible."\n')
    ds = PairedVolumes.from_csv(csv_path, Preprocessing(spacing=(6.0, 6.0, 6.0)))
    item = ds[0]
    assert len(ds) == 1 and item["text"] == "MR of the abdomen, liver visible."
    assert item["image"].ndim == 4 and item["meta"] == {
        "source": "csv",
        "templated": False,
        "modality": "MR",
    }


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("path,report\nvols/missing.nii.gz,some text\n", "missing.nii.gz: volume file listed in"),
        ("file,text\na,b\n", "lacks the column(s) ['path', 'report']"),
        ("path,report\n", "header but no rows"),
        ("path,report\nvols/x.nii.gz,\n", "row 2 has an empty path or report"),
    ],
)
def test_csv_dataset_bad_rows_are_named(tmp_path: Path, content: str, message: str):
    csv_path = tmp_path / "reports.csv"
    csv_path.write_text(content)
    with pytest.raises(DataError) as err:
        PairedVolumes.from_csv(csv_path)
    assert message in str(err.value)
    if "missing" in content:
        assert err.value.path == tmp_path / "vols" / "missing.nii.gz"
        assert "row 2" in str(err.value)


def test_paired_data_config_refuses_unknown_sources():
    with pytest.raises(ValueError, match="unknown data source"):
        PairedDataConfig(sources=["radiopaedia"])


# --------------------------------------------------------------------------- benchmark parts


def test_shuffled_rows_is_a_derangement_within_groups():
    groups = ["a"] * 5 + ["b"] * 3 + ["c"]
    perm = shuffled_rows(groups, seed=0)
    assert sorted(perm.tolist()) == list(range(9))
    for i, j in enumerate(perm):
        assert groups[i] == groups[j]
        assert i != j or groups[i] == "c"  # a group of one has nowhere else to go


def test_scores_on_known_cases():
    metas = [{"label": lab, "class": ["normal", "hyperplasia"][lab]} for lab in (0, 0, 1, 1)]
    cands = ["A: hyperplasia.", "A: normal."]
    for m in metas:
        m["text"] = "A: normal." if m["label"] == 0 else "A: hyperplasia."
    gen = [f"x shape mask: {c}." for c in ("normal", "hyperplasia", "hyperplasia", "hyperplasia")]
    logp = np.array([[-2.0, -1.0], [-1.0, -2.0], [-1.0, -3.0], [-2.0, -1.0]])
    s = adrenal_scores(gen, metas, logp, cands)
    assert s["accuracy"] == 0.75 and s["balanced_accuracy"] == 0.75
    assert s["recall_at_1"] == 0.5 and s["likelihood_auc"] == 0.625
    crops = [
        {"structures": ["liver", "kidney"], "modality": "CT", "text": "t1"},
        {"structures": [], "modality": "CT", "text": "t2"},
    ]
    gen = ["CT of the abdomen. Structures: liver.", "MR of the abdomen. Structures: none."]
    c = crop_scores(gen, crops, np.array([[0.0, -1.0], [0.0, -1.0]]), ["t1", "t2"])
    assert c["structure_f1"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert c["exact_match"] == 0.5 and c["modality_accuracy"] == 0.5 and c["recall_at_1"] == 0.5
    assert c["recall_at_1_calibrated"] == 0.5  # equal rows: every candidate ties after calibration


def test_retrieval_hits_share_ties_and_calibration_removes_the_text_prior():
    scores = np.array([[0.0, 0.0, -1.0], [-3.0, -1.0, -2.0]])
    assert retrieval_hits(scores, np.array([0, 2])).tolist() == [0.5, 0.0]
    # A prefix that carries nothing: every item scores the candidates alike -> chance.
    prior = np.tile([-1.0, -2.0, -5.0], (4, 1)) + 1e-6 * np.arange(4)[:, None]
    own = np.array([0, 1, 2, 2])
    assert retrieval_hits(prior, own).mean() == 0.25  # always the a-priori likeliest text
    assert retrieval_hits(calibrated(prior), own).mean() == pytest.approx(1 / 3)


def test_train_text_lm_writes_a_loadable_folder(tmp_path: Path):
    config = TextLMConfig(n_layer=1, n_embd=16, n_head=2, n_positions=32, steps=3, batch_size=2)
    record = train_text_lm(TEXTS * 4, tmp_path / "lm", config)
    assert record["texts"] == 12 and record["unique_texts"] == 3
    lm, tokenizer = load_causal_lm(tmp_path / "lm")
    assert lm.get_input_embeddings().embedding_dim == 16
    ids = tokenizer(" " + TEXTS[0], add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids).strip() == TEXTS[0]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not a train_text_lm folder"):
        train_text_lm(TEXTS, tmp_path / "other", config)


def test_tokenset_subset_keeps_alignment():
    ts = TokenSet(
        [torch.zeros(2, 3) + i for i in range(3)],
        [torch.zeros(2, 3)] * 3,
        ["a", "b", "c"],
        ["0", "1", "2"],
        [{"i": 0}, {"i": 1}, {"i": 2}],
    )
    sub = ts.subset([2, 0])
    assert sub.texts == ["c", "a"] and float(sub.tokens[0][0, 0]) == 2 and sub.metas[1] == {"i": 0}
