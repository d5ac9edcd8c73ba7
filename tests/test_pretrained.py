"""save_pretrained / from_pretrained: a student round-trips through a folder (and the hub cache)."""

import json
import shutil

import pytest
import torch

from spar.models import create_backbone, from_pretrained, save_pretrained
from spar.models.pretrained import CONFIG_NAME, WEIGHTS_NAME

# The shape of train_summary.json's held-out part (spar.distill.Distiller.summary).
SUMMARY = {
    "heldout_mse_before": 0.1604,
    "heldout_mse_after": 0.0953,
    "heldout_cos_before": 0.9112,
    "heldout_cos_after": 0.9417,
    "heldout_sizes": {
        "448x336": {
            "images": 2,
            "mse_before": 0.1604,
            "mse_after": 0.0953,
            "cos_before": 0.9112,
            "cos_after": 0.9417,
        },
        "768x576": {
            "images": 2,
            "mse_before": 0.2271,
            "mse_after": 0.1580,
            "cos_before": 0.8876,
            "cos_after": 0.9203,
        },
    },
    "steps": 32,
    "images_seen": 32,
    "precision": "float32",
}


@pytest.fixture
def student():
    """A tiny backbone whose trained blocks differ from the seeded initialisation, as after
    distillation (so that loading without the file would give other features)."""
    backbone = create_backbone("tiny", trainable_blocks="last-2")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in backbone.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return backbone


def _outputs(backbone, images):
    with torch.no_grad():
        return backbone(images), backbone.encode_text(["a photo of a cat.", "sky"])


def test_round_trip_through_a_folder(student, tmp_path):
    folder = save_pretrained(student, tmp_path / "student", summary=SUMMARY)
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        CONFIG_NAME,
        "manifest.json",
        WEIGHTS_NAME,
    ]
    images = torch.randn(1, 3, 80, 112, generator=torch.Generator().manual_seed(1))

    loaded = from_pretrained(folder)

    for saved, read in zip(_outputs(student, images), _outputs(loaded, images), strict=True):
        torch.testing.assert_close(read, saved, rtol=0, atol=0)
    fresh_features, _ = _outputs(create_backbone("tiny"), images)
    assert not torch.allclose(fresh_features, _outputs(loaded, images)[0])
    trainable = [
        index
        for index, block in enumerate(loaded.blocks)
        if all(p.requires_grad for p in block.parameters())
    ]
    assert trainable == [2, 3]
    assert loaded.training_summary == SUMMARY
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["backbone"] == "tiny" and config["trainable_blocks"] == [2, 3]
    assert config["training"]["heldout_sizes"]["768x576"]["cos_after"] == 0.9203


def test_model_card_lists_the_heldout_numbers(student, tmp_path):
    folder = save_pretrained(student, tmp_path / "student", summary=SUMMARY)
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: spar\n")
    assert "| 448x336 | 2 | 0.1604 | 0.0953 | 0.9112 | 0.9417 |" in card
    assert "| 768x576 | 2 | 0.2271 | 0.1580 | 0.8876 | 0.9203 |" in card
    assert "32 steps" in card


def test_summary_from_a_file_and_without_one(student, tmp_path):
    summary_file = tmp_path / "train_summary.json"
    summary_file.write_text(json.dumps(SUMMARY))
    folder = save_pretrained(student, tmp_path / "from_file", summary=summary_file)
    assert from_pretrained(folder).training_summary == SUMMARY
    bare = save_pretrained(student, tmp_path / "bare")
    assert "no held-out numbers" in (bare / "README.md").read_text()
    with pytest.raises(FileNotFoundError, match="missing.json"):
        save_pretrained(student, tmp_path / "x", summary=tmp_path / "missing.json")


def test_missing_files_are_named(student, tmp_path):
    folder = save_pretrained(student, tmp_path / "student")
    no_weights = tmp_path / "no_weights"
    shutil.copytree(folder, no_weights)
    (no_weights / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=f"{no_weights / WEIGHTS_NAME} not found"):
        from_pretrained(no_weights)
    (folder / CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=f"{folder / CONFIG_NAME} not found"):
        from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="no student folder"):
        from_pretrained(tmp_path / "nowhere" / "deeper")


def test_weights_of_another_backbone_are_refused(student, tmp_path):
    folder = save_pretrained(student, tmp_path / "student")
    config = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps({**config, "backbone": "siglip2-tiny"}))
    with pytest.raises(ValueError, match=r"config\.json does not match .*manifest\.json"):
        from_pretrained(folder)
    (folder / "manifest.json").unlink()  # a folder of an older spar: loaded, weights checked
    with pytest.warns(UserWarning, match="no manifest.json"):
        with pytest.raises(ValueError, match="do not fit the model"):
            from_pretrained(folder)


def test_hub_id_resolves_through_the_hub_cache(student, tmp_path, monkeypatch):
    """A hub id is read from huggingface_hub's cache layout (offline, as the tests run)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--spar-tiny"
    save_pretrained(student, repo / "snapshots" / commit, summary=SUMMARY)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))

    loaded = from_pretrained("someone/spar-tiny", cache_dir=tmp_path / "hub")

    torch.testing.assert_close(_outputs(loaded, images)[0], _outputs(student, images)[0])
    with pytest.raises(FileNotFoundError):  # huggingface_hub's LocalEntryNotFoundError
        from_pretrained("someone/not-cached", cache_dir=tmp_path / "hub")


def test_local_file_options_are_not_saved(tmp_path):
    """Paths of the saving machine (base weights, vocabulary) stay out of config.json: the
    folder holds the whole model (another family, dinov3txt's layout, round-trips too)."""
    backbone = create_backbone("dinov3txt-tiny", backbone_weights="/elsewhere/dinov3_base.pth")
    folder = save_pretrained(backbone, tmp_path / "student")
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert "backbone_weights" not in config["options"]
    assert config["base_files"] == {"backbone_weights": "dinov3_base.pth"}
    images = torch.randn(1, 3, 64, 48, generator=torch.Generator().manual_seed(3))
    loaded = from_pretrained(folder)
    torch.testing.assert_close(_outputs(loaded, images)[0], _outputs(backbone, images)[0])
