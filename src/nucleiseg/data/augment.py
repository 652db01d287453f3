"""Albumentations pipelines, applied jointly to an image and its instance labels.

The reference notebook's set (CLAHE, rotation, flips, Gaussian noise,
hue/saturation/value, gamma, brightness/contrast) plus random crops and a mild
scale change (nuclei in DSB2018 vary about 4× in diameter between image kinds).
Label images go through with nearest-neighbour interpolation, so every
nucleus keeps its own id and the targets are computed after augmentation.
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import cv2
import numpy as np

#: Stain matrices of Ruifrok & Johnston's colour deconvolution (haematoxylin, eosin, DAB), as scikit-image has
#: them: optical density (rows: R, G, B) to stain amounts, and back.
from skimage.color import hed_from_rgb as _HED_FROM_RGB
from skimage.color import rgb_from_hed as _RGB_FROM_HED

#: An image counts as stained (colour) when its channels differ by at least this much on average (8-bit levels);
#: DSB2018's grey fluorescence and brightfield images are 0, its H&E tissue 20-60.
STAIN_MIN_COLOUR = 8.0


class StainJitter(A.ImageOnlyTransform):
    """Haematoxylin-eosin stain jitter: each stain's amount scaled and shifted at random (Tellez et al. 2018).

    The image is deconvolved into haematoxylin, eosin and DAB optical densities, each multiplied by a
    factor in ``1 ± sigma`` and shifted by up to ``± bias``, and recomposed: another lab's staining
    of the same tissue. Images whose channels hardly differ (grey fluorescence, brightfield: see
    :data:`STAIN_MIN_COLOUR`) are left as they are.

    Examples
    --------
    >>> rgb = np.zeros((8, 8, 3), np.uint8); rgb[...] = (150, 90, 170)  # a purple, stained pixel
    >>> out = StainJitter(p=1.0)(image=rgb)["image"]
    >>> out.shape, out.dtype, bool((out != rgb).any())
    ((8, 8, 3), dtype('uint8'), True)
    >>> grey = np.full((8, 8, 3), 120, np.uint8)
    >>> bool((StainJitter(p=1.0)(image=grey)["image"] == grey).all())
    True
    """

    def __init__(self, sigma: float = 0.1, bias: float = 0.05, p: float = 0.5):
        super().__init__(p=p)
        self.sigma, self.bias = float(sigma), float(bias)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        rng = self.random_generator
        return {"alpha": rng.uniform(1 - self.sigma, 1 + self.sigma, 3), "beta": rng.uniform(-self.bias, self.bias, 3)}

    def apply(self, img: np.ndarray, alpha: np.ndarray, beta: np.ndarray, **params: Any) -> np.ndarray:
        return jitter_stains(img, alpha, beta)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("sigma", "bias")


def jitter_stains(rgb: np.ndarray, alpha, beta) -> np.ndarray:
    """Scale the stain amounts of an 8-bit RGB image by ``alpha`` and shift them by ``beta`` (3 values each).

    Identity for ``alpha = 1, beta = 0`` (up to rounding) and for grey images.

    Examples
    --------
    >>> rgb = np.random.default_rng(0).integers(0, 256, (4, 4, 3)).astype(np.uint8)
    >>> int(np.abs(jitter_stains(rgb, [1, 1, 1], [0, 0, 0]).astype(int) - rgb).max()) <= 1
    True
    """
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        return rgb
    values = rgb.astype(np.float32)
    if float(np.abs(values - values.mean(axis=-1, keepdims=True)).mean()) < STAIN_MIN_COLOUR / 2:
        return rgb
    od = -np.log10((values + 1.0) / 256.0)
    stains = od @ _HED_FROM_RGB.astype(np.float32)
    stains = stains * np.asarray(alpha, np.float32) + np.asarray(beta, np.float32)
    out = 256.0 * np.power(10.0, -(stains @ _RGB_FROM_HED.astype(np.float32))) - 1.0
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def train_transform(crop: int = 256, strength: float = 1.0, stain: float = 0.0) -> A.Compose:
    """Random crop (padding small images by reflection) and the augmentation set.

    Parameters
    ----------
    crop : int
        Side of the square crop fed to the network.
    strength : float
        Scales every photometric transform's probability (0 turns them off,
        leaving crops, flips and rotations).
    stain : float
        Probability of :class:`StainJitter` on a stained (colour) image; 0, the default,
        leaves it out (it was added in the eighth session and has not been measured in a
        training run yet: ``nucleiseg train --stain-augment 0.5``).
    """
    p = max(0.0, min(1.0, strength))
    return A.Compose(
        [
            A.PadIfNeeded(min_height=crop, min_width=crop, border_mode=cv2.BORDER_REFLECT_101),
            A.RandomCrop(crop, crop),
            A.D4(),  # the 8 flips / 90° rotations
            A.Affine(
                scale=(0.75, 1.33),
                rotate=(-45, 45),
                border_mode=cv2.BORDER_REFLECT_101,
                p=0.5,
            ),
            A.CLAHE(clip_limit=(1, 3), p=0.2 * p),
            A.GaussNoise(std_range=(0.01, 0.05), p=0.2 * p),
            A.HueSaturationValue(hue_shift_limit=20, sat_shift_limit=30, val_shift_limit=20, p=0.3 * p),
            A.RandomGamma(gamma_limit=(70, 150), p=0.3 * p),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.3 * p),
            *([StainJitter(p=min(1.0, stain))] if stain > 0 else []),
        ]
    )
