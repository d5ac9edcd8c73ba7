"""ONNX export (spar.export, spar-export): the in-graph position-embedding resample, parity of
the exported file with the torch forward at sizes other than the traced one (onnxruntime on the
CPU), text embeddings, and the errors before export."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, script_environment
from safetensors import safe_open
from torch import nn

from spar.config import _user_error_types
from spar.export import ExportError, export_onnx, export_text_embeddings
from spar.models import create_backbone
from spar.models.pos_embed import resample_pos_embed_by_scale, traced_bicubic_matrix

OFFSET = 0.1  # the DINO convention's scale offset, written out here


def interpolate_rows_cols(table, source, target, convention):
    """F.interpolate bicubic (no antialiasing, align_corners=False) of a (C, h, w) grid."""
    if convention == "size":
        kwargs = {"size": tuple(target)}
    else:
        scale = tuple((t + OFFSET) / s for t, s in zip(target, source, strict=True))
        kwargs = {"scale_factor": scale}
    return F.interpolate(table[None], mode="bicubic", align_corners=False, **kwargs)[0]


@pytest.mark.parametrize("convention", ["scale", "size"])
@pytest.mark.parametrize(
    ("source", "target"),
    [((14, 14), (20, 11)), ((8, 8), (5, 13)), ((7, 5), (1, 30)), ((14, 14), (3, 2))],
)
def test_traced_matrices_resample_as_interpolate(source, target, convention):
    """The tensor-op matrices (built from a length, as under torch.export) are PyTorch's bicubic
    weights: in float64 the product equals F.interpolate to rounding."""
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(6, *source, generator=generator, dtype=torch.float64)

    def step(source_length, length):  # the inverse scale, written out per convention
        if convention == "size":
            value = source_length / length
        else:
            value = 1.0 / ((length + OFFSET) / source_length)
        return torch.tensor([value], dtype=torch.float64)

    rows = traced_bicubic_matrix(source[0], target[0], step(source[0], target[0]), table.device)
    cols = traced_bicubic_matrix(source[1], target[1], step(source[1], target[1]), table.device)
    assert rows.shape == (target[0], source[0]) and rows.dtype == torch.float64
    ours = rows @ table @ cols.T
    expected = interpolate_rows_cols(table, source, target, convention)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)
    # float32: close to the float32 kernel, whose source coordinates are float32.
    ours32 = (rows @ table @ cols.T).float()
    torch.testing.assert_close(
        ours32, interpolate_rows_cols(table.float(), source, target, convention), rtol=0, atol=3e-5
    )


def test_traced_matrix_rows_are_the_cubic_kernel_by_hand():
    """Upsampling 4 -> 8 by size: output 3 reads x = 0.5 * 3.5 - 0.5 = 1.25, index 1, t = 0.25;
    Keys' cubic (a = -0.75) gives these four weights at source 0..3."""
    a, t = -0.75, 0.25

    def near(d):
        return (a + 2) * d**3 - (a + 3) * d**2 + 1

    def far(d):
        return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a

    half = torch.tensor([0.5], dtype=torch.float64)
    matrix = traced_bicubic_matrix(4, 8, half, torch.device("cpu"))
    expected = torch.tensor([far(1 + t), near(t), near(1 - t), far(2 - t)], dtype=torch.float64)
    torch.testing.assert_close(matrix[3], expected, rtol=0, atol=1e-15)
    assert torch.allclose(matrix.sum(1), torch.ones(8, dtype=torch.float64))
    # output 0 reads x = -0.25: the taps at -2 and -1 are clamped onto source 0.
    assert matrix[0, 2:].abs().max() < 1 and matrix[0, 0] > 1


@pytest.mark.parametrize(
    ("source", "target"), [((8, 8), (8, 5)), ((8, 8), (3, 8)), ((8, 8), (8, 8)), ((6, 9), (6, 9))]
)
def test_under_export_a_side_equal_to_the_source_is_still_resampled(monkeypatch, source, target):
    """Under torch.export the by-scale resample (MaskCLIP/CLIP) uses the traced matrices: a grid
    with one side equal to the table's is resampled on both sides (the step is 1 only when
    both sides are equal, where the table is used unchanged)."""
    table = torch.randn(source[0] * source[1], 5, dtype=torch.float64)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    ours = resample_pos_embed_by_scale(table, source, target)
    if source == target:
        torch.testing.assert_close(ours, table, rtol=0, atol=0)
        return
    grid = table.reshape(*source, -1).permute(2, 0, 1)
    expected = interpolate_rows_cols(grid, source, target, "scale").permute(1, 2, 0).flatten(0, 1)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)
    assert not torch.allclose(ours[: target[1]], table[: target[1]])  # the equal side moved too


def test_an_unwritable_destination_is_named_before_export(tmp_path, tiny_backbone):
    missing = tmp_path / "no" / "such" / "student.onnx"
    with pytest.raises(ExportError, match="folder .* does not exist"):
        export_onnx(tiny_backbone, missing)
    with pytest.raises(ExportError, match=r"must end in \.onnx"):
        export_onnx(tiny_backbone, tmp_path / "student.pt")
    (tmp_path / "folder.onnx").mkdir()
    with pytest.raises(ExportError, match="is a folder"):
        export_onnx(tiny_backbone, tmp_path / "folder.onnx")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ExportError, match="permission denied"):
            export_onnx(tiny_backbone, locked / "student.onnx")
    if os.path.isdir("/sys/kernel"):  # a folder that refuses new files even to root
        with pytest.raises(ExportError, match=r"^cannot write /sys/student\.onnx: permission "):
            export_onnx(tiny_backbone, "/sys/student.onnx")
    assert issubclass(ExportError, _user_error_types())  # scripts print it as one line
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_unsupported_backbones_and_heads_are_named(tmp_path, tiny_backbones):
    class Plain(nn.Module):
        patch_size = 16

    with pytest.raises(ExportError, match="cannot export Plain"):
        export_onnx(Plain(), tmp_path / "plain.onnx")
    other_head = create_backbone("tiny")
    other_head.dense_head = "sclip"
    with pytest.raises(ExportError, match="dense_head='sclip' cannot be exported"):
        export_onnx(other_head, tmp_path / "sclip.onnx")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("size", [(16, 80), (80, 3), (64,), (64.0, 80), "64x80"])
def test_an_example_size_that_would_fix_the_graph_is_refused(tmp_path, tiny_backbone, size):
    with pytest.raises(ExportError, match="example_size"):
        export_onnx(tiny_backbone, tmp_path / "student.onnx", example_size=size)
    assert not list(tmp_path.iterdir())


def test_without_the_onnx_extra_the_export_says_what_to_install(tmp_path, tiny_backbone):
    if importlib.util.find_spec("onnxscript") and importlib.util.find_spec("onnx"):
        pytest.skip("the onnx extra is installed")
    with pytest.raises(ExportError, match=r"pip install 'spar\[onnx\]'"):
        export_onnx(tiny_backbone, tmp_path / "student.onnx")


def test_text_embeddings_are_the_prompt_averages(tmp_path, tiny_backbone):
    path = export_text_embeddings(
        tiny_backbone, ["sky", "car, automobile"], tmp_path / "classes.safetensors", "single"
    )
    with safe_open(str(path), "pt") as file:
        embeddings, name_to_class = file.get_tensor("embeddings"), file.get_tensor("name_to_class")
        metadata = file.metadata()
    prompts = ["a photo of a sky.", "a photo of a car.", "a photo of a automobile."]
    with torch.no_grad():
        encoded = tiny_backbone.encode_text(prompts).float()
    expected = encoded / encoded.norm(dim=-1, keepdim=True)  # one template: the mean is itself
    torch.testing.assert_close(embeddings, expected, rtol=0, atol=1e-6)
    assert name_to_class.tolist() == [0, 1, 1]
    assert metadata["classes"] == "sky\ncar, automobile"


def test_text_embeddings_refuse_a_bad_destination_before_encoding(tmp_path, tiny_backbone):
    with pytest.raises(ExportError, match="does not exist"):
        export_text_embeddings(tiny_backbone, ["sky"], tmp_path / "no" / "t.safetensors")


# --- The exported graph against the torch forward (onnxruntime, CPU) --------------------------

# Traced at 99x83 (not a patch multiple), run at sizes that are neither that nor each other:
# patch multiples, partial patches, a single patch row, up- and downsampled position grids.
EXAMPLE_SIZE = (99, 83)
# (224, 128): one side on the table's own grid (tiny: 14 rows; siglip2-tiny: 8 columns).
SIZES = [(1, (64, 96)), (2, (100, 70)), (2, (32, 240)), (1, (144, 160)), (1, (224, 128))]
TOLERANCE = 1e-4  # max |onnx - torch| / max |torch|
BACKBONES = {  # key: (registry name, options)
    "tiny": ("tiny", {}),
    "clip-tiny-p14": ("clip-tiny-p14", {}),  # patch 14
    "siglip2-tiny": ("siglip2-tiny", {}),
    # patch_fit="stretch" (the default): the bicubic stretch is in the graph, an ONNX Resize.
    "dinov3txt-tiny": ("dinov3txt-tiny", {}),
    "dinov3txt-tiny-pad": ("dinov3txt-tiny", {"patch_fit": "pad"}),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``exported(key)``: (backbone, onnxruntime session) of a tiny backbone, exported once."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    made = {}

    def get(key):
        if key not in made:
            name, options = BACKBONES[key]
            backbone = create_backbone(name, **options)
            path = tmp_path_factory.mktemp("onnx") / f"{key}.onnx"
            export_onnx(backbone, path, example_size=EXAMPLE_SIZE)
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            made[key] = backbone, session
        return made[key]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("key", BACKBONES)
def test_the_onnx_file_matches_the_torch_forward_at_other_sizes(exported, key):
    backbone, session = exported(key)
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["features"]
    metadata = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    assert metadata["mean"] == pytest.approx(backbone.mean)
    assert metadata["patch_size"] == backbone.patch_size == (14 if "p14" in key else 16)
    assert metadata["std"] == pytest.approx(backbone.std)
    assert metadata["backbone"] == BACKBONES[key][0]
    generator = torch.Generator().manual_seed(1)
    for batch, (height, width) in SIZES:
        images = torch.randn(batch, 3, height, width, generator=generator)
        with torch.no_grad():
            expected = backbone(images)
        (ours,) = session.run(None, {"images": images.numpy()})
        patch = backbone.patch_size
        grid = (-(-height // patch), -(-width // patch))
        assert ours.shape == (batch, backbone.embed_dim, *grid) == tuple(expected.shape)
        error = (torch.from_numpy(ours) - expected).abs().max() / expected.abs().max()
        assert error <= TOLERANCE, (key, batch, height, width, float(error))


@pytest.mark.slow
@pytest.mark.parametrize("key", ["tiny", "siglip2-tiny"])
def test_the_native_grid_uses_the_table_unchanged(exported, key):
    """At the native grid the eager forward adds the learned table as it is; the graph's matrices
    are then the identity (the DINO convention's step is 1 there, not 1 / (1 + 0.1 / n))."""
    backbone, session = exported(key)
    images = torch.randn(1, 3, *backbone.native_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = backbone(images)
    (ours,) = session.run(None, {"images": images.numpy()})
    error = (torch.from_numpy(ours) - expected).abs().max() / expected.abs().max()
    assert error <= TOLERANCE


@pytest.mark.slow
def test_spar_export_writes_the_file_and_the_text_embeddings(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    output = tmp_path / "student.onnx"
    command = [
        sys.executable,
        str(ROOT / "scripts" / "export.py"),
        f"output={output}",
        "classes=[sky,'car, automobile']",
        "templates=single",
        "example_size=[64,64]",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    env = script_environment(os.environ)
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert output.is_file() and (tmp_path / "student.text.safetensors").is_file()
    assert f"dense forward: {output}" in done.stdout


@pytest.mark.slow
def test_spar_export_names_an_unwritable_output_in_one_line(tmp_path):
    output = tmp_path / "missing" / "student.onnx"
    command = [sys.executable, "-m", "spar.export_onnx", f"output={output}"]
    env = script_environment(os.environ)
    done = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert lines == [f"error: cannot write {output}: folder {output.parent} does not exist"]
