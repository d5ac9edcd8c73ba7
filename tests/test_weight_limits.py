"""Loading is bounded and finite: a small file cannot make the reader build much more than its
own size, a compressed archive is refused before it is expanded, weights holding NaN or inf (or
integers where the model is floating) are refused, a missing local folder is never looked up on
the hub, and timm is never handed a weight file of its own to read."""

import contextlib
import hashlib
import json
import tracemalloc
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from spar.distill import Distiller, OptimSettings, TeacherTargets, TrainerSettings
from spar.models import (
    SlidingWindowTeacher,
    WeightLoadingError,
    create_backbone,
    from_pretrained,
    save_pretrained,
)
from spar.models.checkpoint import CHECKPOINT_FORMAT, read_released_weights
from spar.models.weights import (
    check_finite_tensors,
    is_hub_id,
    load_state_dict_strict,
    read_weight_file,
)
from spar.refine.build import build_affinity_backbone, check_stage_settings, load_anyup

pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol 4:UserWarning")


# -- crafted pickles ------------------------------------------------------------------------------


def amplifying_pickle(depth: int) -> bytes:
    """``str(x)`` of a memoised nested list ``x = [y, y]``, ``y = [z, z]``, ... ``depth`` deep:
    9 bytes per level, and the text of ``x`` doubles with each level (``6 * 2**depth - 4``
    characters). Opcodes the weights-only unpickler runs: PROTO, EMPTY_LIST, BINPUT, MARK,
    BINGET, APPENDS, GLOBAL, TUPLE1, REDUCE, STOP.
    """
    ops = [b"\x80\x02", b"]q\x00"]  # memo[0] = []
    for level in range(1, depth + 1):
        below = bytes([level - 1])
        ops.append(b"]q" + bytes([level]) + b"(h" + below + b"h" + below + b"e")  # [m, m]
    ops.append(b"cbuiltins\nstr\nh" + bytes([depth]) + b"\x85R.")  # str(memo[depth])
    return b"".join(ops)


def copying_pickle(length: int, copies: int) -> bytes:
    """A list of ``length`` integers, then ``copies`` times ``builtins.list`` of it, appended to
    one list: a few bytes per copy, ``length`` objects built per copy."""
    ops = [b"\x80\x02", b"cbuiltins\nlist\nq\x00", b"]q\x01("]  # memo[0] = list; memo[1] = []
    ops += [b"K\x07"] * length  # BININT1 7
    ops.append(b"e]q\x02(")  # APPENDS; memo[2] = [] (the result), MARK
    ops += [b"h\x00h\x01\x85R"] * copies  # list(memo[1])
    ops.append(b"e.")  # APPENDS; STOP
    return b"".join(ops)


def plain_builtins_pickle() -> bytes:
    """``{"name": str(7), "tags": frozenset([1, 2])}``: stand-ins on plain values, as saved
    hyper-parameters use them."""
    return (
        b"\x80\x02}q\x00(X\x04\x00\x00\x00name"
        b"cbuiltins\nstr\nK\x07\x85R"
        b"X\x04\x00\x00\x00tags"
        b"cbuiltins\nfrozenset\n]q\x01(K\x01K\x02e\x85Ru."
    )


@contextlib.contextmanager
def bounded_memory(limit: int):
    """Fail when the Python allocations inside the block peak above ``limit`` bytes (a refusal
    must come before the payload is expanded; a deterministic bound, not a clock)."""
    tracemalloc.start()
    try:
        yield
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < limit, f"peak {peak} bytes"


def write_pickle_as_torch_zip(path, payload: bytes) -> None:
    """A ``torch.save`` zip whose ``data.pkl`` is ``payload``."""
    torch.save({"w": torch.zeros(1)}, path)
    with zipfile.ZipFile(path) as original:
        records = {name: original.read(name) for name in original.namelist()}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as crafted:
        for name, data in records.items():
            crafted.writestr(name, payload if name.endswith("data.pkl") else data)


def test_the_crafted_pickles_amplify_under_plain_pickle():
    """The payloads do what they are built for when nothing bounds them."""
    import pickle

    text = pickle.loads(amplifying_pickle(10))
    assert len(text) == 6 * 2**10 - 4 and len(amplifying_pickle(10)) == 2 + 3 + 90 + 19
    copies = pickle.loads(copying_pickle(100, 50))
    assert len(copies) == 50 and all(copy == [7] * 100 for copy in copies)


def test_str_of_a_memoised_nested_list_is_refused_at_once(tmp_path):
    path = tmp_path / "amplify.ckpt"
    write_pickle_as_torch_zip(path, amplifying_pickle(24))  # 100 MB of text, 5 s before
    with bounded_memory(16 << 20):  # the text would take 100 MB
        with pytest.raises(
            WeightLoadingError, match=r"amplify\.ckpt: builtins\.str applied to a list"
        ):
            read_weight_file(path)


def test_copies_past_the_files_budget_are_refused(tmp_path):
    path = tmp_path / "copies.pt"
    write_pickle_as_torch_zip(path, copying_pickle(200, 2000))  # 400,000 objects, 10 KB
    assert path.stat().st_size < 20_000
    with pytest.raises(WeightLoadingError, match=r"copies\.pt: it builds more than 4 objects"):
        read_weight_file(path)


def test_stand_ins_on_plain_values_still_load(tmp_path):
    path = tmp_path / "plain.ckpt"
    write_pickle_as_torch_zip(path, plain_builtins_pickle())
    assert read_weight_file(path) == {"name": "7", "tags": frozenset({1, 2})}


# -- compressed archives ---------------------------------------------------------------------------


def write_deflated_torch_file(path, values: int = 1_000_000) -> None:
    """``torch.save`` of ``values`` float32 zeros (4 MB), re-zipped with deflate (~4 KB)."""
    torch.save({"state_dict": {"w": torch.zeros(values)}}, path)
    with zipfile.ZipFile(path) as original:
        records = {info: original.read(info.filename) for info in original.infolist()}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as deflated:
        for info, data in records.items():
            deflated.writestr(info.filename, data)


def test_a_compressed_archive_is_refused_before_it_is_expanded(tmp_path, monkeypatch):
    path = tmp_path / "bomb.ckpt"
    write_deflated_torch_file(path)
    assert path.stat().st_size < 40_000
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("the archive was read"))
    with pytest.raises(WeightLoadingError, match=r"bomb\.ckpt: its zip entries expand to 4\.0 MB"):
        read_weight_file(path)


def test_the_expansion_limit_is_a_setting(tmp_path, monkeypatch):
    path = tmp_path / "deflated.pt"
    write_deflated_torch_file(path)
    monkeypatch.setenv("SPAR_MAX_ZIP_EXPANSION", "100000")
    assert torch.equal(read_weight_file(path)["state_dict"]["w"], torch.zeros(1_000_000))
    monkeypatch.setenv("SPAR_MAX_ZIP_EXPANSION", "zero")
    with pytest.raises(WeightLoadingError, match="SPAR_MAX_ZIP_EXPANSION must be a number > 0"):
        read_weight_file(path)


# -- values --------------------------------------------------------------------------------------


def _spoiled(state: dict, name: str, how: str) -> dict:
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    if how == "nan":
        state[name].view(-1)[3] = float("nan")
    elif how == "inf":
        state[name].view(-1)[0] = float("inf")
    else:
        state[name] = state[name].to(torch.int64)
    return state


SPOILS = {"nan": r"NaN or inf: {name} \(1 of", "inf": r"NaN or inf: {name} \(1 of",
          "int64": r"non-floating .*: {name} \(torch\.int64\)"}  # fmt: skip


@pytest.mark.parametrize("how", sorted(SPOILS))
def test_spar_checkpoint_with_bad_values_is_refused(tmp_path, how):
    student = create_backbone("tiny", pretrained=None, trainable_blocks="last-1")
    trained = {k: p for k, p in student.named_parameters() if p.requires_grad}
    name = sorted(k for k, p in trained.items() if p.numel() > 4)[0]
    path = tmp_path / "bad.safetensors"
    metadata = {"format": CHECKPOINT_FORMAT, "backbone": '{"name": "tiny"}', "extra": "{}"}
    save_file(_spoiled(trained, name, how), str(path), metadata=metadata)
    pattern = rf"{path}.*" + SPOILS[how].format(name=name)
    with pytest.raises(WeightLoadingError, match=pattern):
        create_backbone("tiny", pretrained=None, checkpoint=path)


@pytest.mark.parametrize("how", sorted(SPOILS))
def test_local_pretrained_file_with_bad_values_is_refused(tmp_path, how):
    state = create_backbone("tiny", pretrained=None).model.state_dict()
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 4)
    path = tmp_path / "base.pt"
    torch.save(_spoiled(state, name, how), path)
    with pytest.raises(WeightLoadingError, match=rf"{path}.*" + SPOILS[how].format(name=name)):
        create_backbone("tiny", pretrained=str(path))


def test_from_pretrained_folder_with_a_nan_is_refused(tmp_path):
    folder = save_pretrained(create_backbone("tiny", pretrained=None), tmp_path / "student")
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    name = sorted(k for k, v in state.items() if v.is_floating_point() and v.numel() > 4)[0]
    save_file(_spoiled(state, name, "nan"), str(folder / "model.safetensors"))
    # The manifest made to match (a folder written so by another tool): the values still count.
    manifest = json.loads((folder / "manifest.json").read_text())
    data = (folder / "model.safetensors").read_bytes()
    manifest["files"]["model.safetensors"] = hashlib.blake2b(data, digest_size=16).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(WeightLoadingError, match=rf"model\.safetensors: .*NaN or inf: {name}"):
        from_pretrained(folder)


def test_integer_weights_in_an_official_dinov3_file_are_refused_after_timms_conversion(tmp_path):
    """timm's DINOv3 key conversion splits the qkv bias; the int64 pieces are still named."""
    from test_dinov3txt import ARCH, official_backbone_state, official_head_and_text_state

    backbone = official_backbone_state(ARCH)
    backbone["blocks.0.attn.qkv.bias"] = (backbone["blocks.0.attn.qkv.bias"] * 100).to(torch.int64)
    torch.save(backbone, tmp_path / "backbone.pth")
    torch.save(official_head_and_text_state(ARCH), tmp_path / "head.pth")
    with pytest.raises(
        WeightLoadingError,
        match=r"^refused the weights from backbone\.pth \+ head\.pth: non-floating tensors .*: "
        r"visual_model\.backbone\.blocks\.0\.attn\.q_bias \(torch\.int64\)",
    ):
        create_backbone(
            "dinov3txt-tiny",
            pretrained="official",
            backbone_weights=str(tmp_path / "backbone.pth"),
            weights=str(tmp_path / "head.pth"),
        )


def test_refinement_weights_with_an_inf_are_refused(tmp_path):
    state = load_anyup(None).state_dict()
    name = sorted(k for k, v in state.items() if v.is_floating_point() and v.numel() > 4)[0]
    path = tmp_path / "anyup.pth"
    torch.save(_spoiled(state, name, "inf"), path)
    with pytest.raises(WeightLoadingError, match=rf"anyup\.pth \(upsample\.weights\).*{name}"):
        load_anyup(path)


def test_partial_load_as_on_resume_checks_values_and_leaves_integer_buffers_alone():
    """Resume loads the state's parameters with ``load_state_dict_strict(partial=True)``."""
    module = torch.nn.BatchNorm1d(3)
    good = {"weight": torch.ones(3), "num_batches_tracked": torch.tensor(5)}
    load_state_dict_strict(module, good, source="last.state.pt", partial=True)
    assert int(module.num_batches_tracked) == 5
    bad = {"bias": torch.tensor([0.0, float("-inf"), float("nan")])}
    with pytest.raises(WeightLoadingError, match=r"last\.state\.pt: .*bias \(2 of 3 values\)"):
        load_state_dict_strict(module, bad, source="last.state.pt", partial=True)
    assert torch.equal(module.bias, torch.zeros(3))  # nothing was loaded


# -- local paths and hub ids -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "hub"),
    [
        ("someone/spar-tiny", True),
        ("hf-hub:someone/spar-tiny", True),
        ("students/siglip2", False),  # students/ is a folder here
        ("./someone/spar-tiny", False),
        ("../someone", False),
        ("/abs/folder", False),
        ("~/students/siglip2", False),
        ("a/b/c", False),
        ("someone/weights.safetensors", False),
        ("someone/config.json", False),
        ("someone\\spar", False),
        ("spar-tiny", False),
        ("someone/", False),
    ],
)
def test_hub_id_rule(tmp_path, monkeypatch, value, hub):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "students").mkdir()
    assert is_hub_id(value) is hub


def test_a_missing_local_student_folder_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    (tmp_path / "students" / "dino").mkdir(parents=True)
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", lambda **k: pytest.fail("looked up on the hub")
    )
    with pytest.raises(FileNotFoundError, match=r"no student folder students/siglip2 \(a local"):
        from_pretrained("students/siglip2")
    with pytest.raises(WeightLoadingError, match="weight file not found: students/siglip2"):
        create_backbone("tiny", pretrained=None, checkpoint="students/siglip2")
    with pytest.raises(WeightLoadingError, match="file not found: students/siglip2"):
        create_backbone("tiny", pretrained="students/siglip2")


# -- timm options ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"checkpoint_path": "dino.pth"},
        {"pretrained_cfg_overlay": {"file": "dino.pth"}},
        {"pretrained_cfg": {"file": "dino.pth"}},
    ],
)
def test_timm_options_naming_a_file_are_refused(options):
    refine = {"name": "lposs", "affinity": {"model": "vit_tiny_patch16_224", "options": options}}
    option = next(iter(options))
    message = (
        rf"refine\.affinity\.options\.{option} names a weight file .* refine\.affinity\.weights"
    )
    with pytest.raises(ValueError, match=message):
        check_stage_settings(refine, None)
    with pytest.raises(ValueError, match=message):
        build_affinity_backbone({**refine["affinity"], "weights": None})


def test_timm_options_without_a_file_pass():
    options = {"pretrained_cfg_overlay": {"hf_hub_id": "timm/vit_small_patch16_224.dino"}}
    check_stage_settings({"name": "lposs", "affinity": {"options": options}}, None)


# -- every entry point, and resume -----------------------------------------------------------------

UNBOUNDED_FILES = {
    "amplify.ckpt": lambda path: write_pickle_as_torch_zip(path, amplifying_pickle(24)),
    "bomb.pt": write_deflated_torch_file,
}
ENTRY_POINTS = {
    "create_backbone(checkpoint=)": lambda path: create_backbone("tiny", checkpoint=path),
    "create_backbone(pretrained=)": lambda path: create_backbone("tiny", pretrained=str(path)),
    "load_anyup": load_anyup,
    "read_released_weights": read_released_weights,
}


@pytest.mark.parametrize("entry_point", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("name", sorted(UNBOUNDED_FILES))
def test_unbounded_files_are_refused_quickly_everywhere(tmp_path, name, entry_point):
    path = tmp_path / name
    UNBOUNDED_FILES[name](path)
    with bounded_memory(16 << 20):  # the payloads take 100-220 MB when read unbounded
        with pytest.raises(WeightLoadingError, match=rf"refused to read {path}: "):
            ENTRY_POINTS[entry_point](path)


def tiny_distiller(out_dir) -> Distiller:
    """A Distiller on the tiny backbone (nothing is trained; only save and resume are used)."""
    student = create_backbone("tiny", trainable_blocks="last-2")
    return Distiller(
        student,
        TeacherTargets(SlidingWindowTeacher(create_backbone("tiny")), out_dir),
        views=["unused.jpg"],
        heldout=[],
        out_dir=out_dir,
        optim=OptimSettings(),
        settings=TrainerSettings(epochs=1),
    )


@pytest.mark.parametrize("how", sorted(SPOILS))
def test_resume_refuses_a_state_with_bad_weights(tmp_path, how):
    tiny_distiller(tmp_path).save()
    state_path = tmp_path / "checkpoints" / "last.state.pt"
    saved = torch.load(state_path, weights_only=True)
    name = sorted(k for k, v in saved["weights"].items() if v.numel() > 4)[0]
    saved["weights"] = _spoiled(saved["weights"], name, how)
    torch.save(saved, state_path)
    with pytest.raises(
        WeightLoadingError, match=rf"{state_path}.*" + SPOILS[how].format(name=name)
    ):
        tiny_distiller(tmp_path).resume(tmp_path)


def test_resume_refuses_a_state_whose_optimizer_moments_hold_a_nan(tmp_path):
    tiny_distiller(tmp_path).save()
    state_path = tmp_path / "checkpoints" / "last.state.pt"
    saved = torch.load(state_path, weights_only=True)
    moments = torch.zeros(4, 3)
    moments[2, 1] = float("nan")
    saved["optimizer"]["state"][0] = {"step": torch.tensor(1.0), "exp_avg": moments}
    torch.save(saved, state_path)
    with pytest.raises(
        WeightLoadingError,
        match=rf"^refused {state_path}: tensors holding NaN or inf: optimizer\.state\.0\.exp_avg "
        r"\(1 of 12 values\)$",
    ):
        tiny_distiller(tmp_path).resume(tmp_path)


@pytest.mark.parametrize("name", sorted(UNBOUNDED_FILES))
def test_resume_refuses_an_unbounded_state_file(tmp_path, name):
    state_path = tmp_path / "checkpoints" / "last.state.pt"
    state_path.parent.mkdir()
    UNBOUNDED_FILES[name](state_path)
    with pytest.raises(WeightLoadingError, match=rf"refused to read {state_path}: "):
        tiny_distiller(tmp_path).resume(tmp_path)


def test_nested_state_with_a_nan_is_named():
    """What resume can check the optimizer state with."""
    moments = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.tensor([1.0, torch.nan])}}}
    with pytest.raises(WeightLoadingError, match=r"^refused s\.pt \(optimizer\): .*: "
                       r"state\.0\.exp_avg \(1 of 2 values\)$"):  # fmt: skip
        check_finite_tensors(moments, "s.pt (optimizer)")
    check_finite_tensors({"state": {0: {"step": torch.tensor(3), "ids": [torch.ones(2)]}}}, "s.pt")


def test_bytearray_of_a_large_number_is_refused_before_unpickling(tmp_path):
    """``bytearray(2**40)``: 30 bytes that torch's own weights-only unpickler would expand to a
    terabyte; spar refuses the global before unpickling."""
    path = tmp_path / "zeros.pt"
    write_pickle_as_torch_zip(
        path, b"\x80\x02cbuiltins\nbytearray\n\x8a\x06\x00\x00\x00\x00\x00\x01\x85R."
    )
    with pytest.raises(WeightLoadingError, match=r"zeros\.pt: it names builtins\.bytearray"):
        read_weight_file(path)
