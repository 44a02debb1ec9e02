"""The weak (reference) and strong (query) views of crop pairs, batched, on any device.

MASS (Gao et al., https://arxiv.org/abs/2603.13660) augments the reference crop weakly and the
query crop strongly. The randomness is split from the work so that the views can be computed
where the model runs (DESIGN.md, "Scale"):

* :func:`draw_view_params` draws one sample's parameters from the sample's own numpy generator
  (in the DataLoader, beside the crops), as small arrays under the :data:`PARAM_KEYS`;
* :func:`augment_views` applies a whole batch's parameters with plain torch operations on the
  batch's device: on the accelerator after the transfer
  (:meth:`omnienc.pretext.data.PretrainDataModule.on_after_batch_transfer`), or in the loader
  on a batch of one (:func:`augment_sample`) for CPU runs. Both give the same views.

Gaussian noise comes from a counter-based hash of ``(noise seed, voxel index)``, not from a
device generator, so it is the same on the CPU and on a GPU. MONAI's random transforms
(``RandFlipd``, ``RandGaussianNoised``, ...) draw from their own numpy state one sample at a
time, which is why the views are written here; their parameter ranges are MONAI's.

The strong view: a flip along each axis and a 90-degree rotation in the axial plane (only when
that plane is square, so the crop shape never changes), then optionally a random affine map
(rotation, scale and shear, interpolated: off by default), applied to the image and the task masks
alike; then, on the image only, intensity scale ``x * (1 + f)``, shift ``x + o``, gamma contrast
(MONAI's ``AdjustContrast``), Gaussian noise and Gaussian smoothing. The weak view: intensity
scale and shift only; its masks are untouched.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from omnienc.config import JsonConfig

PARAM_PREFIX = "aug_"
PARAM_KEYS = (
    "aug_ref_scale",
    "aug_ref_shift",
    "aug_flip",
    "aug_rot90",
    "aug_scale",
    "aug_shift",
    "aug_gamma",
    "aug_noise_std",
    "aug_noise_seed",
    "aug_sigma",
    "aug_affine",
)
_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class ViewConfig(JsonConfig):
    """Probabilities and ranges of the two views (MONAI's ``Rand*`` conventions).

    Attributes:
        ref_scale: ``(p, f)``: the reference is scaled by ``1 + U(-f, f)`` with probability p.
        ref_shift: ``(p, o)``: shifted by ``U(-o, o)``.
        flip: Probability of a flip along each axis of the query.
        rot90: Probability of a rotation by 90, 180 or 270 degrees in the axial plane.
        scale: ``(p, f)`` of the query.
        shift: ``(p, o)`` of the query.
        gamma: ``(p, low, high)``: gamma contrast with ``gamma ~ U(low, high)``.
        noise: ``(p, s)``: Gaussian noise of standard deviation ``U(0, s)``.
        smooth: ``(p, low, high)``: Gaussian smoothing, ``sigma ~ U(low, high)`` per axis.
        affine: ``(p, degrees, scale, shear)``: the query (image and masks) resampled through
            a random affine map about the crop's centre: a rotation by ``U(-degrees, degrees)``
            about each axis, a scale ``1 + U(-scale, scale)`` per axis and shears
            ``U(-shear, shear)``, in the crop's normalised coordinates (rigid for a cubic
            crop); trilinear for the image (edge values outside), masks cut at 0.5 (empty
            outside). MASS's strong view is of this kind (30 degrees, 0.3, 0.1); unlike flips
            and quarter turns it leaves no voxel where it was, so the head cannot find the
            query's copy of the reference voxel for voxel.

    ``flip`` and ``rot90`` make the head match a structure whatever the query's orientation,
    which also makes mirror images (a left and a right kidney) alike; every volume is read in
    RAS order, so at inference the query is never turned. Set both to 0 to keep orientation.
    A view with probability 0 is off, and its range is not checked.
    """

    ref_scale: tuple[float, float] = (0.5, 0.1)
    ref_shift: tuple[float, float] = (0.5, 0.05)
    flip: float = 0.5
    rot90: float = 0.5
    scale: tuple[float, float] = (0.8, 0.2)
    shift: tuple[float, float] = (0.8, 0.1)
    gamma: tuple[float, float, float] = (0.3, 0.7, 1.5)
    noise: tuple[float, float] = (0.3, 0.05)
    smooth: tuple[float, float, float] = (0.2, 0.5, 1.0)
    affine: tuple[float, float, float, float] = (0.0, 30.0, 0.3, 0.1)

    def __post_init__(self) -> None:
        sizes = {"ref_scale": 2, "ref_shift": 2, "scale": 2, "shift": 2, "noise": 2}
        sizes |= {"gamma": 3, "smooth": 3, "flip": 0, "rot90": 0, "affine": 4}
        for name, n in sizes.items():
            value = getattr(self, name)
            try:
                numbers = (float(value),) if n == 0 else tuple(float(v) for v in value)
            except (TypeError, ValueError):
                numbers = ()
            if len(numbers) != max(n, 1) or not all(math.isfinite(v) for v in numbers):
                what = "a number" if n == 0 else f"{n} finite numbers (p, ...)"
                raise ValueError(f"view {name} takes {what}, got {value!r}")
            if not 0.0 <= numbers[0] <= 1.0:
                raise ValueError(f"view {name}: probability must be in [0, 1], got {numbers[0]}")
            if n in (2, 4) and min(numbers[1:]) < 0:
                raise ValueError(f"view {name}: the ranges must be >= 0, got {numbers[1:]}")
            if n == 3 and numbers[0] > 0 and not 0.0 < numbers[1] <= numbers[2]:
                raise ValueError(f"view {name}: needs 0 < low <= high, got {numbers[1:]}")
            object.__setattr__(self, name, numbers[0] if n == 0 else numbers)

    @property
    def smooth_radius(self) -> int:
        """Half-width of every smoothing kernel, ``ceil(4 * sigma_max)`` (fixed per config)."""
        return max(1, math.ceil(4.0 * self.smooth[2]))


def draw_view_params(
    rng: np.random.Generator, crop_size: Sequence[int], config: ViewConfig | None = None
) -> dict[str, np.ndarray]:
    """Draw one sample's view parameters; the same number of draws whatever comes out.

    Args:
        rng: The sample's generator (after :func:`omnienc.pretext.pairs.sample_pair`).
        crop_size: ``(S_x, S_y, S_z)``; no rotation unless ``S_x == S_y``.
        config: Probabilities and ranges (default :class:`ViewConfig`).

    Returns:
        Arrays under :data:`PARAM_KEYS`: scalars ``aug_ref_scale``, ``aug_ref_shift``,
        ``aug_scale``, ``aug_shift``, ``aug_gamma`` (1: off), ``aug_noise_std`` (0: off)
        float32, ``aug_rot90`` (quarter turns, 0..3) and ``aug_noise_seed`` int64;
        ``aug_flip`` ``(3,)`` bool; ``aug_sigma`` ``(3,)`` float32 (zeros: off);
        ``aug_affine`` ``(3, 3)`` float32 (identity: off).
    """
    c = config or ViewConfig()
    coin = rng.random(11)
    turns = int(rng.integers(1, 4))
    ref_f, ref_o = rng.uniform(-1.0, 1.0, 2) * (c.ref_scale[1], c.ref_shift[1])
    f, o = rng.uniform(-1.0, 1.0, 2) * (c.scale[1], c.shift[1])
    gamma = rng.uniform(c.gamma[1], c.gamma[2])
    std = rng.uniform(0.0, c.noise[1])
    seed = int(rng.integers(0, 2**32))
    sigma = rng.uniform(c.smooth[1], c.smooth[2], 3)
    affine = _affine_matrix(rng, c.affine)  # drawn last: the draws above keep their values
    square = crop_size[0] == crop_size[1]

    def f32(value: float) -> np.ndarray:
        return np.asarray(value, dtype=np.float32)

    return {
        "aug_ref_scale": f32(1.0 + ref_f if coin[0] < c.ref_scale[0] else 1.0),
        "aug_ref_shift": f32(ref_o if coin[1] < c.ref_shift[0] else 0.0),
        "aug_flip": coin[2:5] < c.flip,
        "aug_rot90": np.asarray(turns if coin[5] < c.rot90 and square else 0, dtype=np.int64),
        "aug_scale": f32(1.0 + f if coin[6] < c.scale[0] else 1.0),
        "aug_shift": f32(o if coin[7] < c.shift[0] else 0.0),
        "aug_gamma": f32(gamma if coin[8] < c.gamma[0] else 1.0),
        "aug_noise_std": f32(std if coin[9] < c.noise[0] else 0.0),
        "aug_noise_seed": np.asarray(seed, dtype=np.int64),
        "aug_sigma": (sigma if coin[10] < c.smooth[0] else np.zeros(3)).astype(np.float32),
        "aug_affine": affine,
    }


def _affine_matrix(rng: np.random.Generator, spec: Sequence[float]) -> np.ndarray:
    """A random ``(3, 3)`` float32 affine matrix (identity unless the ``p`` coin comes up).

    Args:
        rng: The sample's generator; six uniform draws and a coin, whatever comes out.
        spec: ``(p, degrees, scale, shear)`` (:attr:`ViewConfig.affine`).
    """
    p, degrees, scale, shear = spec
    coin = rng.random()
    angles = np.deg2rad(rng.uniform(-degrees, degrees, 3))
    scales = 1.0 + rng.uniform(-scale, scale, 3)
    shears = rng.uniform(-shear, shear, 6)
    if coin >= p:
        return np.eye(3, dtype=np.float32)
    out = np.diag(scales)
    for axis, a in enumerate(angles):
        i, j = [k for k in range(3) if k != axis]
        turn = np.eye(3)
        turn[i, i] = turn[j, j] = np.cos(a)
        turn[i, j], turn[j, i] = -np.sin(a), np.sin(a)
        out = turn @ out
    out[~np.eye(3, dtype=bool)] += shears
    return out.astype(np.float32)


def _mul32(x: torch.Tensor, a: int) -> torch.Tensor:
    """``(x * a) mod 2**32`` for int64 ``x`` in ``[0, 2**32)``, without int64 overflow."""
    lo = x * (a & 0xFFFF)
    hi = ((x * (a >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """Chris Wellons' ``lowbias32`` integer hash, elementwise on int64 values in ``[0, 2**32)``."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hash_normal(seeds: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Standard normal noise from ``(seed, voxel index)`` alone: the same on every device.

    Two hashed 24-bit uniforms per voxel in ``(0, 1)``, through the Box-Muller transform.

    Args:
        seeds: ``(N,)`` int64 in ``[0, 2**32)``.
        shape: The per-sample shape, e.g. ``(1, S_x, S_y, S_z)``.

    Returns:
        ``(N, *shape)`` float32 on ``seeds.device``.
    """
    n_vox = math.prod(shape)
    index = torch.arange(n_vox, device=seeds.device, dtype=torch.int64)
    key = _hash32(seeds.to(torch.int64) & _M32)[:, None]  # (N, 1)
    scale = 1.0 / 2**24

    def uniform(stream: int) -> torch.Tensor:
        bits = _hash32(key ^ _hash32((2 * index + stream) & _M32)) >> 8
        return (bits.to(torch.float32) + 0.5) * scale

    u1, u2 = uniform(0), uniform(1)
    normal = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
    return normal.reshape(len(seeds), *shape)


def _smooth(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian smoothing with one sigma per sample and axis (edges replicated).

    Args:
        x: ``(N, 1, X, Y, Z)`` float.
        sigma: ``(N, 3)`` positive.
        radius: Kernel half-width.

    Returns:
        ``(N, 1, X, Y, Z)``.
    """
    n = x.shape[0]
    d = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    out = x.reshape(1, n, *x.shape[2:])  # the samples as channels of one grouped convolution
    for axis in range(3):
        kernel = torch.exp(-0.5 * (d[None, :] / sigma[:, axis : axis + 1].to(x.dtype)) ** 2)
        kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (N, 2r+1)
        shape = [n, 1, 1, 1, 1]
        shape[2 + axis] = 2 * radius + 1
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        out = F.conv3d(F.pad(out, pad, mode="replicate"), kernel.reshape(shape), groups=n)
    return out.reshape(x.shape)


def _where_rows(flag: torch.Tensor) -> torch.Tensor:
    """Indices of the samples whose ``flag`` is set, ``(n,)`` int64."""
    return torch.nonzero(flag, as_tuple=False).reshape(-1)


def augment_views(
    batch: Mapping[str, torch.Tensor], config: ViewConfig | None = None
) -> dict[str, torch.Tensor]:
    """Apply the drawn views to a batch on its own device; a batch without parameters passes.

    Args:
        batch: ``ref_image``/``query_image`` ``(B, 1, S_x, S_y, S_z)`` float,
            ``ref_masks``/``query_masks`` ``(B, T, S_x, S_y, S_z)`` float, ``task_valid``
            ``(B, T)`` and the parameters under :data:`PARAM_KEYS` (``(B,)`` or ``(B, 3)``, as
            collated from :func:`draw_view_params`). Not modified.
        config: Only its smoothing radius is used (the parameters carry the rest).

    Returns:
        A new dict with the same image and mask keys, augmented, and no parameter keys.
    """
    if PARAM_KEYS[0] not in batch:
        return dict(batch)
    c = config or ViewConfig()
    out = {k: v for k, v in batch.items() if not k.startswith(PARAM_PREFIX)}
    ref = batch["ref_image"]
    b = ref.shape[0]
    # Scalars as (B,) and per-axis values as (B, 3), however they were collated.
    p = {k: batch[k].reshape(b, -1) for k in PARAM_KEYS}
    p = {k: v[:, 0] if v.shape[1] == 1 else v for k, v in p.items()}

    def col(key: str, like: torch.Tensor) -> torch.Tensor:
        return p[key].to(like.dtype).reshape(b, 1, 1, 1, 1)

    out["ref_image"] = ref * col("aug_ref_scale", ref) + col("aug_ref_shift", ref)

    image = batch["query_image"].clone()
    masks = batch["query_masks"].clone()
    for axis in range(3):
        rows = _where_rows(p["aug_flip"][:, axis])
        if len(rows):
            image[rows] = image[rows].flip(2 + axis)
            masks[rows] = masks[rows].flip(2 + axis)
    for turns in (1, 2, 3):
        rows = _where_rows(p["aug_rot90"] == turns)
        if len(rows):
            image[rows] = torch.rot90(image[rows], turns, dims=(2, 3))
            masks[rows] = torch.rot90(masks[rows], turns, dims=(2, 3))

    eye = torch.eye(3, dtype=p["aug_affine"].dtype, device=image.device).reshape(1, 9)
    rows = _where_rows((p["aug_affine"] != eye).any(dim=1))
    if len(rows):
        theta = torch.zeros(len(rows), 3, 4, dtype=image.dtype, device=image.device)
        theta[:, :, :3] = p["aug_affine"][rows].to(image.dtype).reshape(-1, 3, 3)
        grid = F.affine_grid(theta, list(image[rows].shape), align_corners=False)
        image[rows] = F.grid_sample(image[rows], grid, padding_mode="border", align_corners=False)
        moved = F.grid_sample(masks[rows].to(image.dtype), grid, align_corners=False)
        masks[rows] = (moved > 0.5).to(masks.dtype)
    image = image * col("aug_scale", image) + col("aug_shift", image)
    rows = _where_rows(p["aug_gamma"] != 1.0)
    if len(rows):
        x = image[rows]
        lo = x.amin(dim=(1, 2, 3, 4), keepdim=True)
        span = x.amax(dim=(1, 2, 3, 4), keepdim=True) - lo
        gamma = p["aug_gamma"][rows].to(x.dtype).reshape(-1, 1, 1, 1, 1)
        image[rows] = ((x - lo) / (span + 1e-7)) ** gamma * span + lo
    rows = _where_rows(p["aug_noise_std"] > 0)
    if len(rows):
        noise = hash_normal(p["aug_noise_seed"][rows], image.shape[1:]).to(image.dtype)
        std = p["aug_noise_std"][rows].to(image.dtype).reshape(-1, 1, 1, 1, 1)
        image[rows] = image[rows] + std * noise
    rows = _where_rows(p["aug_sigma"][:, 0] > 0)
    if len(rows):
        image[rows] = _smooth(image[rows], p["aug_sigma"][rows], c.smooth_radius)
    out["query_image"], out["query_masks"] = image, masks
    return out


def augment_sample(
    sample: Mapping[str, torch.Tensor], config: ViewConfig | None = None
) -> dict[str, torch.Tensor]:
    """:func:`augment_views` on one unbatched sample (the CPU path, in the DataLoader).

    Args:
        sample: One sample's tensors (no batch axis), parameters included.
        config: As in :func:`augment_views`.

    Returns:
        The augmented sample, without the parameters.
    """
    batch = augment_views({k: v[None] for k, v in sample.items()}, config)
    return {k: v[0] for k, v in batch.items()}
