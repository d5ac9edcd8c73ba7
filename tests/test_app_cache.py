"""The page's model cache (spar.tools.app.ModelCache, without Gradio): a checkpoint file or
student folder rewritten on disk is loaded again, an unchanged one is served from the cache."""

import os

import torch

from spar.models import create_backbone, save_pretrained
from spar.models.checkpoint import save_checkpoint
from spar.tools import app


def _student(seed: int):
    backbone = create_backbone("tiny", trainable_blocks="last-1")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in backbone.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return backbone


def _touch(path, seconds: int) -> None:
    """A distinct mtime (file systems with coarse timestamps could otherwise keep one)."""
    os.utime(path, (seconds, seconds))


def test_a_rewritten_file_is_loaded_again_and_an_unchanged_one_is_not(tmp_path):
    calls = []

    def load(name, checkpoint, device):
        calls.append(checkpoint)
        return {"content": open(checkpoint, "rb").read()}

    cache = app.ModelCache(load)
    path = tmp_path / "best.safetensors"
    path.write_bytes(b"first")
    _touch(path, 1_000)
    first = cache.get("tiny", str(path), "cpu")
    assert cache.get("tiny", f" {path} ", "cpu") is first  # the page's text, with spaces
    assert first == {"content": b"first"} and len(calls) == 1

    path.write_bytes(b"other")  # same size, other bytes: training rewrote best.safetensors
    _touch(path, 2_000)
    second = cache.get("tiny", str(path), "cpu")
    assert second == {"content": b"other"} and len(calls) == 2
    assert len(cache.entries) == 1  # the entry of the earlier content is gone
    assert cache.get("tiny", str(path), "cpu") is second and len(calls) == 2


def test_the_cache_keeps_at_most_its_size_least_recently_used_first_out(tmp_path):
    cache = app.ModelCache(lambda name, checkpoint, device: object(), size=2)
    a, b, c = (cache.get(name, "", "cpu") for name in ("a", "b", "c"))
    assert [key[0] for key in cache.entries] == ["b", "c"]
    assert cache.get("c", "", "cpu") is c and cache.get("a", "", "cpu") is not a


def test_the_page_loads_a_rewritten_checkpoint_file_again(tmp_path):
    path = tmp_path / "best.safetensors"
    first, second = _student(1), _student(2)
    save_checkpoint(path, first)
    _touch(path, 1_000)
    app._MODELS.clear()
    name = "model.visual.transformer.resblocks.3.mlp.c_fc.weight"
    loaded = app.load_backbone("tiny", str(path), "cpu")
    assert torch.equal(loaded.state_dict()[name], first.state_dict()[name])
    assert app.load_backbone("tiny", str(path), "cpu") is loaded

    save_checkpoint(path, second)  # the file the page lists, rewritten
    _touch(path, 2_000)
    reloaded = app.load_backbone("tiny", str(path), "cpu")
    assert torch.equal(reloaded.state_dict()[name], second.state_dict()[name])
    assert not torch.equal(reloaded.state_dict()[name], first.state_dict()[name])


def test_the_page_loads_a_student_folder_saved_again(tmp_path):
    folder = tmp_path / "student"
    first, second = _student(3), _student(4)
    save_pretrained(first, folder)
    app._MODELS.clear()
    name = "model.visual.transformer.resblocks.3.mlp.c_proj.weight"
    loaded = app.load_backbone("tiny", str(folder), "cpu")
    assert torch.equal(loaded.state_dict()[name], first.state_dict()[name])
    save_pretrained(second, folder)
    reloaded = app.load_backbone("tiny", str(folder), "cpu")
    assert torch.equal(reloaded.state_dict()[name], second.state_dict()[name])
    assert app.load_backbone("tiny", str(folder), "cpu") is reloaded


def test_fingerprints_of_no_checkpoint_a_hub_id_and_a_missing_file_are_empty(tmp_path):
    assert app.checkpoint_fingerprint("") == ""
    assert app.checkpoint_fingerprint("someone/spar-tiny") == ""
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"abc")
    assert app.checkpoint_fingerprint(str(path)) != app.checkpoint_fingerprint("")
