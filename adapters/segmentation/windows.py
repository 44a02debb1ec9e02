"""Sliding windows over one volume with a frozen encoder: its features computed once, reused.

Few-shot methods sweep a query with windows the size of the reference crop (MONAI's
``sliding_window_inference``, Gaussian blending), and several supports and structures are
matched against the same query. :class:`WindowFeatures` runs the encoder over the query's
windows once, keeps every window's ``forward_intermediates``, and blends any per-window map
computed from them (:meth:`WindowFeatures.blend`) exactly as a fresh sweep would, window
coordinates checked. :func:`centred_crop` (from :mod:`omnienc.transforms`, shared with the
pretext's :func:`~omnienc.pretext.segment.segment_fewshot`) cuts the reference crop around a mask.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from omnienc.encoders import Encoder
from omnienc.transforms import centred_crop

__all__ = ["WindowFeatures", "WindowFn", "centred_crop"]

WindowFn = Callable[[list[torch.Tensor], tuple[int, int, int]], torch.Tensor]
"""Maps one batch's intermediates (``(n, C_i, d_i, h_i, w_i)`` per scale) and the window size
``(S_x, S_y, S_z)`` to ``(n, K, S_x, S_y, S_z)`` values (``K`` maps at once)."""


def _device(module: torch.nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def _coords(slices: Sequence[Sequence[slice]]) -> tuple[tuple[int | None, ...], ...]:
    """A hashable key of MONAI's window slices (one list of slices per window of a batch)."""
    return tuple(tuple(v for s in window for v in (s.start, s.stop)) for window in slices)


class WindowFeatures:
    """The encoder intermediates of every sliding window of one preprocessed volume.

    The windows, their order, the padding of a volume smaller than a window (its minimum) and
    the Gaussian blending weights are MONAI's ``sliding_window_inference``'s, so
    :meth:`blend` returns what a sweep with the encoder inside the predictor would.

    Args:
        encoder: A frozen encoder (run in eval mode under ``torch.inference_mode``).
        image: ``(X, Y, Z)`` float32 preprocessed volume.
        roi_size: Window size ``(S_x, S_y, S_z)``.
        overlap: Fraction of a window shared with its neighbours, in ``[0, 1)``.
        batch_size: Windows per encoder call.

    Attributes:
        windows: Number of windows.
    """

    def __init__(
        self,
        encoder: Encoder,
        image: np.ndarray,
        roi_size: Sequence[int],
        overlap: float = 0.5,
        batch_size: int = 4,
    ) -> None:
        if image.ndim != 3:
            raise ValueError(f"expected an (X, Y, Z) volume, got shape {image.shape}")
        self.roi_size = tuple(int(s) for s in roi_size)
        self.overlap = float(overlap)
        self.batch_size = int(batch_size)
        self._image = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
        self._cval = float(image.min())
        self._device = _device(encoder)
        self._feats: dict[tuple[tuple[int | None, ...], ...], list[torch.Tensor]] = {}
        was_training = encoder.training
        encoder.eval()
        try:

            def encode(windows: torch.Tensor, slices: Sequence[Sequence[slice]]) -> torch.Tensor:
                self._feats[_coords(slices)] = encoder.forward_intermediates(windows)
                return windows[:, :1]

            self._sweep(encode)
        finally:
            encoder.train(was_training)
        self.windows = sum(f[0].shape[0] for f in self._feats.values())

    def _sweep(self, predictor: Callable[..., torch.Tensor]) -> np.ndarray:
        with torch.inference_mode():
            out = sliding_window_inference(
                self._image.to(self._device),
                roi_size=self.roi_size,
                sw_batch_size=self.batch_size,
                predictor=predictor,
                overlap=self.overlap,
                mode="gaussian",
                padding_mode="constant",
                cval=self._cval,
                with_coord=True,
            )
        assert isinstance(out, torch.Tensor)
        return out.as_subclass(torch.Tensor)[0].float().cpu().numpy()

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(X, Y, Z)`` of the volume."""
        x, y, z = (int(n) for n in self._image.shape[2:])
        return (x, y, z)

    def padding(self) -> tuple[int, ...]:
        """The sweep's padding of a volume smaller than a window, in ``F.pad`` order.

        MONAI pads such a volume symmetrically (the extra voxel after) before cutting windows,
        so window boxes are coordinates of the padded volume.

        Returns:
            ``(z_before, z_after, y_before, y_after, x_before, x_after)``.
        """
        pad: list[int] = []
        for axis in (2, 1, 0):
            diff = max(self.roi_size[axis] - self.shape[axis], 0)
            pad += [diff // 2, diff - diff // 2]
        return tuple(pad)

    def per_window(self) -> Iterator[tuple[tuple[slice, slice, slice], list[torch.Tensor]]]:
        """Every window's box and intermediates, in the sweep's order.

        Yields:
            The window's ``(slice, slice, slice)`` box on the volume padded by
            :meth:`padding`, and its ``forward_intermediates``: ``(1, C_i, d_i, h_i, w_i)``
            per scale.
        """
        for key, feats in self._feats.items():
            for i, c in enumerate(key):  # the batch's and channel's slices come first
                box = (slice(c[4], c[5]), slice(c[6], c[7]), slice(c[8], c[9]))
                yield box, [f[i : i + 1] for f in feats]

    def blend(self, fn: WindowFn) -> np.ndarray:
        """Blend ``fn``'s per-window maps over the volume.

        Args:
            fn: See :data:`WindowFn`; called once per batch of windows, with no gradients.

        Returns:
            ``(K, X, Y, Z)`` float32 on the volume's grid.
        """

        def predictor(windows: torch.Tensor, slices: Sequence[Sequence[slice]]) -> torch.Tensor:
            feats = self._feats.get(_coords(slices))
            if feats is None:  # MONAI changed its window order or the volume was replaced
                raise RuntimeError("window coordinates differ from the encoded sweep")
            size = windows.shape[2:]
            return fn(feats, (int(size[0]), int(size[1]), int(size[2]))).float()

        return self._sweep(predictor)
