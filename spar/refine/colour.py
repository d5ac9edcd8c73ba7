"""sRGB to CIE Lab (D65), the colour space of LPOSS+'s pixel affinities."""

from __future__ import annotations

import torch

# sRGB (linear) -> XYZ under the D65 white point (IEC 61966-2-1).
_RGB_TO_XYZ = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
_D65_WHITE = (0.950456, 1.0, 1.088754)
_EPSILON = (6 / 29) ** 3


def rgb_to_lab(pixels: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) sRGB in [0, 1] -> (..., 3, H, W) float32 Lab (L in [0, 100], a and b in
    about [-128, 127]), on ``pixels``' device."""
    if pixels.shape[-3] != 3:
        raise ValueError(f"pixels must have 3 channels at dim -3, got {tuple(pixels.shape)}")
    rgb = pixels.float().clamp(0, 1)
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055).pow(2.4), rgb / 12.92)
    matrix = torch.tensor(_RGB_TO_XYZ, device=rgb.device)
    white = torch.tensor(_D65_WHITE, device=rgb.device).view(3, 1, 1)
    xyz = torch.einsum("ij,...jhw->...ihw", matrix, linear) / white
    f = torch.where(
        xyz > _EPSILON, xyz.clamp_min(_EPSILON).pow(1 / 3), xyz / (3 * (6 / 29) ** 2) + 4 / 29
    )
    fx, fy, fz = f.unbind(-3)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=-3)
