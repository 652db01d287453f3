import math

import torch

from nucleiseg.losses import DeepSupervisionLoss, soft_dice_loss


def test_zero_logits_on_empty_target_hand_value():
    # sigmoid(0) = 0.5 everywhere: BCE = log 2; Dice per channel = 1 - 1 / (0.5 * 2 * 64 + 1)
    loss = DeepSupervisionLoss()([torch.zeros(2, 3, 8, 8)] * 2, torch.zeros(2, 3, 8, 8))
    assert math.isclose(float(loss), math.log(2) + 1 - 1 / 65, rel_tol=1e-6)


def test_confident_correct_prediction_has_near_zero_loss():
    target = torch.zeros(1, 2, 8, 8)
    target[:, :, 2:6, 2:6] = 1
    logits = (target * 2 - 1) * 20
    assert float(DeepSupervisionLoss()([logits], target)) < 1e-3


def test_dice_is_per_channel():
    target = torch.zeros(1, 2, 4, 4)
    target[:, 0] = 1
    logits = torch.full((1, 2, 4, 4), 30.0)
    dice = soft_dice_loss(logits, target)
    assert dice[0] < 1e-3 and dice[1] > 0.9


def test_head_and_channel_weights():
    target = torch.zeros(1, 2, 4, 4)
    good, bad = torch.full((1, 2, 4, 4), -30.0), torch.full((1, 2, 4, 4), 30.0)
    only_first_head = DeepSupervisionLoss(head_weights=[1.0, 0.0])
    assert float(only_first_head([good, bad], target)) < 0.1
    assert float(DeepSupervisionLoss()([good, bad], target)) > 1.0
    bad_second_channel = torch.cat([good[:, :1], bad[:, 1:]], dim=1)
    assert float(DeepSupervisionLoss(channel_weights=[1.0, 0.0])([bad_second_channel], target)) < 0.1
