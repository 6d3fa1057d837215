"""Weight-free differentiable rewards on x in [0, 1] (B, 3, H, W); each returns one score per image.

Closed forms (means are over all pixels of one image):
  saturation      mean((max_c x - min_c x) / (max_c x + eps))                       HSV saturation, in [0, 1]
  brightness      mean(Y), Y = 0.299 R + 0.587 G + 0.114 B (Rec.601 luma); with a target t: -|mean(Y) - t|
  colourfulness   sqrt(sd(rg)^2 + sd(yb)^2) + 0.3 sqrt(mean(rg)^2 + mean(yb)^2),  rg = R - G, yb = (R + G)/2 - B
                  (Hasler & Suesstrunk 2003, computed on [0, 1] values, i.e. their 0-255 metric / 255)
  target_colour   1 - mean(||x - c||_2) / sqrt(3)                                   1 when every pixel equals c
  target_hue      mean(a cos h* + b sin h*) / 2,  a = 2R - G - B, b = sqrt(3) (G - B)
                  (a, b) is the chroma vector whose angle is the hue h = atan2(b, a) and whose length is about twice
                  the HSV chroma, so this is mean(chroma * cos(h - h*)): saturated pixels of the target hue score up
                  to 1, grey pixels 0, the opposite hue -1. It is linear in x, so its gradient never vanishes.
  sharpness       var(L), L = 3x3 Laplacian [[0,1,0],[1,-4,1],[0,1,0]] of the luma (valid region): the classic
                  "variance of the Laplacian" focus measure
  compressibility -bits,  incompressibility +bits, with the JPEG-like bit cost
                  bits = mean over 8x8 blocks, YCbCr channels and the 63 AC coefficients of log2(1 + |c| / q)
                  c = orthonormal 8x8 DCT-II of (255 * channel), q = the standard JPEG quantisation table (luma for Y,
                  chroma for Cb/Cr) scaled to ``quality`` with the IJG formula. A JPEG encoder spends roughly
                  log2(|c|/q) bits per non-zero quantised coefficient, so this smooth surrogate (|c| smoothed as
                  sqrt(c^2 + eps)) ranks images like their JPEG file size while being differentiable (no rounding).
                  DDPO's jpeg (in)compressibility rewards use the real, non-differentiable file size.
"""
import math

import torch
import torch.nn.functional as F

from .base import Reward

LUMA = (0.299, 0.587, 0.114)
EPS = 1e-6


def luma(x):
    w = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def saturation(x):
    mx, mn = x.amax(1), x.amin(1)
    return ((mx - mn) / (mx + EPS)).mean((1, 2))


def brightness(x, target=None):
    y = luma(x).mean((1, 2, 3))
    return y if target is None else -(y - target).abs()


def colourfulness(x):
    r, g, b = x.unbind(1)
    rg, yb = (r - g).flatten(1), (0.5 * (r + g) - b).flatten(1)
    sigma = (rg.var(1, unbiased=False) + yb.var(1, unbiased=False) + EPS).sqrt()
    mu = (rg.mean(1) ** 2 + yb.mean(1) ** 2 + EPS).sqrt()
    return sigma + 0.3 * mu


def target_colour(x, colour):
    c = torch.as_tensor(colour, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    dist = ((x - c).pow(2).sum(1) + EPS).sqrt()
    return 1.0 - dist.mean((1, 2)) / math.sqrt(3.0)


def target_hue(x, hue_degrees):
    r, g, b = x.unbind(1)
    a, bb = 2 * r - g - b, math.sqrt(3.0) * (g - b)
    h = math.radians(hue_degrees)
    return ((a * math.cos(h) + bb * math.sin(h)) / 2).mean((1, 2))


_LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))


def sharpness(x):
    k = torch.tensor(_LAPLACIAN, dtype=x.dtype, device=x.device).view(1, 1, 3, 3)
    lap = F.conv2d(luma(x), k).flatten(1)
    return lap.var(1, unbiased=False)


# --- JPEG-like bit cost ------------------------------------------------------------------------------------------

# ITU-T T.81 Annex K tables (luminance, chrominance), row-major 8x8.
_Q_LUMA = (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
           14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
           49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99)
_Q_CHROMA = (17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
             47, 66, 99, 99, 99, 99, 99, 99) + (99,) * 32


def quant_table(base, quality):
    """IJG quality scaling: S = 5000/q (q < 50) or 200 - 2q; Q = clamp(floor((S * base + 50) / 100), 1, 255)."""
    quality = min(max(int(quality), 1), 100)
    s = 5000 / quality if quality < 50 else 200 - 2 * quality
    return torch.tensor([min(max((s * v + 50) // 100, 1), 255) for v in base], dtype=torch.float32).view(8, 8)


def dct_matrix(n=8):
    """Orthonormal DCT-II matrix D (D @ v transforms a column v)."""
    k = torch.arange(n, dtype=torch.float64).view(-1, 1)
    i = torch.arange(n, dtype=torch.float64).view(1, -1)
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.float()


def ycbcr(x):
    """JFIF RGB -> YCbCr on [0, 255], level-shifted by -128 (as a JPEG encoder does before the DCT)."""
    r, g, b = (255 * x).unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b
    return torch.stack([y - 128, cb, cr], 1)


def blocks8(x):
    """(B, C, H, W) -> (B, C, N, 8, 8) non-overlapping blocks; sizes below a multiple of 8 are cropped (8 px minimum)."""
    b, c, h, w = x.shape
    if h < 8 or w < 8:
        x = F.pad(x, (0, max(0, 8 - w), 0, max(0, 8 - h)), mode="replicate")
        h, w = x.shape[-2:]
    x = x[..., : h // 8 * 8, : w // 8 * 8]
    x = x.unfold(2, 8, 8).unfold(3, 8, 8)          # B, C, H/8, W/8, 8, 8
    return x.reshape(b, c, -1, 8, 8)


def jpeg_bits(x, quality=95):
    """Mean smooth bit cost per AC coefficient (see the module docstring)."""
    d = dct_matrix().to(x)
    coeffs = d @ blocks8(ycbcr(x)) @ d.T            # B, 3, N, 8, 8
    q = torch.stack([quant_table(_Q_LUMA, quality)] + [quant_table(_Q_CHROMA, quality)] * 2).to(x).view(1, 3, 1, 8, 8)
    cost = torch.log2(1 + (coeffs.pow(2) + EPS).sqrt() / q)
    ac = torch.ones(8, 8, dtype=x.dtype, device=x.device)
    ac[0, 0] = 0                                   # the DC term is coded differentially; ignore it
    return (cost * ac).sum((-1, -2)).mean((1, 2)) / 63


# --- Reward wrappers -------------------------------------------------------------------------------------------

class SimpleReward(Reward):
    """A weight-free reward given by a function of the image batch (see the module docstring for each formula)."""

    needs_text = False

    def __init__(self, name, fn, score_range=(0.0, 1.0), min_size=1, **params):
        super().__init__()
        self.name, self.fn, self.params, self.score_range, self.min_size = name, fn, params, score_range, min_size
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)  # carries .device for the protocol

    def score(self, images, prompts):
        return self.fn(images.float().clamp(0, 1), **self.params)

    def extra_repr(self):
        return super().extra_repr() + (f", params={self.params}" if self.params else "")


_KINDS = {
    # kind: (fn, typical range, {config key: default}[, smallest image side])
    "saturation": (saturation, (0.0, 1.0), {}),
    "brightness": (brightness, (0.0, 1.0), {"target": None}),
    "colourfulness": (colourfulness, (0.0, 0.6), {}),
    "target_colour": (target_colour, (0.4, 1.0), {"colour": (1.0, 0.0, 0.0)}),
    "target_hue": (target_hue, (-1.0, 1.0), {"hue_degrees": 0.0}),
    "sharpness": (sharpness, (0.0, 0.05), {}, 4),         # a variance over at least 2x2 Laplacian values
    "compressibility": (lambda x, quality: -jpeg_bits(x, quality), (-3.0, 0.0), {"quality": 95}),
    "incompressibility": (jpeg_bits, (0.0, 3.0), {"quality": 95}),
}


def build(name, config, files=None):
    """Registry loader for the weight-free rewards; config = {"kind": ..., plus that kind's parameters}."""
    kind = config.get("kind", name)
    if kind not in _KINDS:
        raise ValueError(f"unknown weight-free reward {kind!r}; use one of {sorted(_KINDS)}")
    fn, score_range, defaults, *min_size = _KINDS[kind]
    params = {k: config.get(k, v) for k, v in defaults.items()}
    return SimpleReward(name, fn, score_range, *min_size, **params)
