import pytest
import torch
from torch import nn

from nucleiseg.models import UNetPlusPlus
from nucleiseg.models.fuse import fold_conv_bn, fuse_batchnorm, is_fused


@pytest.fixture
def net() -> UNetPlusPlus:
    """A tiny network whose BatchNorms hold non-trivial running statistics and affine parameters."""
    torch.manual_seed(0)
    net = UNetPlusPlus(in_channels=3, out_channels=3, widths=(4, 8, 16, 32))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.5, 0.5)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(2, 3, 32, 32) * 2.0 + 0.5)
    return net.eval()


def test_fused_network_has_no_batchnorm_and_keeps_its_class(net):
    fused = fuse_batchnorm(net)
    assert isinstance(fused, UNetPlusPlus)
    assert is_fused(fused) and not is_fused(net)
    assert sum(isinstance(m, nn.Identity) for m in fused.modules()) == sum(
        isinstance(m, nn.BatchNorm2d) for m in net.modules()
    )
    assert not fused.training
    assert all(not p.requires_grad for p in fused.parameters())
    # The original is left alone.
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())


def test_fused_outputs_equal_the_original(net):
    stats = [m.running_var for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert any((v - 1).abs().max() > 0.05 for v in stats), "running statistics should be non-trivial"
    fused = fuse_batchnorm(net)
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        for ref, out in zip(net(pad(x)), fused(pad(x))):
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(fused.predict_proba(x), net.predict_proba(x), rtol=0, atol=1e-5)
    for k in (1, 2, 3):
        torch.testing.assert_close(
            fused.predict_proba(x, prune_level=k), net.predict_proba(x, prune_level=k), rtol=0, atol=1e-5
        )


def test_fused_channels_last_equals_the_original(net):
    fused = fuse_batchnorm(net).to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fused.predict_proba(x), net.predict_proba(x), rtol=0, atol=1e-5)


def test_fold_conv_bn_with_and_without_bias():
    torch.manual_seed(1)
    for bias in (False, True):
        conv = nn.Conv2d(3, 5, 3, padding=1, bias=bias)
        bn = nn.BatchNorm2d(5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3)
        bn.weight.data.uniform_(0.5, 2)
        bn.bias.data.uniform_(-1, 1)
        bn.eval()
        x = torch.randn(2, 3, 9, 7)
        with torch.no_grad():
            torch.testing.assert_close(fold_conv_bn(conv, bn)(x), bn(conv(x)), rtol=0, atol=1e-5)


def test_inplace_fuse_changes_the_model_itself(net):
    same = fuse_batchnorm(net, inplace=True)
    assert same is net and is_fused(net)


def pad(x: torch.Tensor) -> torch.Tensor:
    from nucleiseg.models.unetplusplus import pad_to_multiple

    return pad_to_multiple(x, 8)
