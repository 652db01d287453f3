"""Albumentations pipelines, applied jointly to an image and its instance labels.

The reference notebook's set (CLAHE, rotation, flips, Gaussian noise,
hue/saturation/value, gamma, brightness/contrast) plus random crops and a mild
scale change (nuclei in DSB2018 vary about 4× in diameter between image kinds).
Label images go through with nearest-neighbour interpolation, so every
nucleus keeps its own id and the targets are computed after augmentation.
"""

from __future__ import annotations

import albumentations as A
import cv2


def train_transform(crop: int = 256, strength: float = 1.0) -> A.Compose:
    """Random crop (padding small images by reflection) and the augmentation set.

    Parameters
    ----------
    crop : int
        Side of the square crop fed to the network.
    strength : float
        Scales every photometric transform's probability (0 turns them off,
        leaving crops, flips and rotations).
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
        ]
    )
