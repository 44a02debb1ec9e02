"""Class-agnostic 3D mask proposals for the in-context pretext, with an on-disk cache.

MASS (Gao et al., CVPR 2026, https://arxiv.org/abs/2603.13660) pretrains by in-context
segmentation of class-agnostic masks that SAM2 proposes on a GPU. Here the proposals come by
default from classical 3D image analysis in SimpleITK, NumPy and SciPy: no model weights, no GPU.
One module per provider family, the name -> provider dict beside them:

* :mod:`~omnienc.pretext.masks.config`: :class:`MaskConfig` (every parameter enters the cache key);
* :mod:`~omnienc.pretext.masks.image`: the body mask and the equalised image every provider sees;
* :mod:`~omnienc.pretext.masks.classical`: ``merge``, ``otsu``, ``watershed``, ``slic``;
* :mod:`~omnienc.pretext.masks.sam2`: ``sam2``, MASS's own generator (SAM2 through transformers
  on seed slices, propagated, 3D NMS), with its checkpoint loading in
  :mod:`~omnienc.pretext.masks.sam2_checkpoint`; imported on first use (torch, transformers), so
  not exported here;
* :mod:`~omnienc.pretext.masks.providers`: :data:`MASK_PROVIDERS` and :func:`propose_masks`;
* :mod:`~omnienc.pretext.masks.cache`: one bit-packed ``.npz`` per volume and config;
* :mod:`~omnienc.pretext.masks.folder`: :func:`compute_folder_masks`, the ``omnienc masks`` driver;
* :mod:`~omnienc.pretext.masks.settings`: the mask-cache settings of a pretraining config.

**Plugging in a SAM-style provider.** A provider is any function with the signature
``(image, body, config) -> list[np.ndarray]`` returning boolean ``(X, Y, Z)`` masks, best first,
at most ``config.max_masks`` of them. For example a provider that runs another automatic mask
generator on axial slices and propagates the masks through the volume::

    from omnienc.pretext.masks import MASK_PROVIDERS, MaskConfig
    MASK_PROVIDERS["mine"] = my_masks          # plain dict, no registry decorator
    config = MaskConfig(providers=("mine", "merge"))

Its own parameters (checkpoint, thresholds) belong to the function or a closure; only its name
enters the cache key, so give it a new name when they change.
"""

from omnienc.pretext.masks.cache import MaskResult, load_masks, mask_cache_path, save_masks
from omnienc.pretext.masks.classical import (
    merge_masks,
    merge_partitions,
    otsu_masks,
    slic_masks,
    watershed_masks,
)
from omnienc.pretext.masks.config import MASK_CACHE_VERSION, MIN_EXTENT, MaskConfig, MaskProvider
from omnienc.pretext.masks.folder import compute_folder_masks, format_mask_summary
from omnienc.pretext.masks.image import body_mask, equalize
from omnienc.pretext.masks.providers import MASK_PROVIDERS, propose_masks
from omnienc.pretext.masks.settings import MaskSettings, read_mask_settings

__all__ = [
    "MASK_CACHE_VERSION",
    "MASK_PROVIDERS",
    "MIN_EXTENT",
    "MaskConfig",
    "MaskProvider",
    "MaskResult",
    "MaskSettings",
    "body_mask",
    "compute_folder_masks",
    "equalize",
    "format_mask_summary",
    "load_masks",
    "mask_cache_path",
    "merge_masks",
    "merge_partitions",
    "otsu_masks",
    "propose_masks",
    "read_mask_settings",
    "save_masks",
    "slic_masks",
    "watershed_masks",
]
