import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from nucleiseg.errors import NucleisegError
from nucleiseg.models import UNetPlusPlus, build_model, load_model_file, save_model


@pytest.fixture
def net() -> UNetPlusPlus:
    torch.manual_seed(0)
    return UNetPlusPlus(in_channels=3, out_channels=3, widths=(4, 8, 16, 32)).eval()


def test_heads_have_input_shape_in_every_mode(net):
    x = torch.randn(2, 3, 32, 48)
    heads = net(x)
    assert len(heads) == net.depth == 3
    assert all(h.shape == (2, 3, 32, 48) for h in heads)
    for k in (1, 2, 3):
        assert len(net(x, prune_level=k)) == k
    assert net.predict_proba(x).shape == (2, 3, 32, 48)
    assert net.predict_proba(x, prune_level=1).shape == (2, 3, 32, 48)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pruned_network_equals_head_k_of_full_network(net, k):
    x = torch.randn(1, 3, 64, 64)
    full = net(x)
    pruned = net(x, prune_level=k)
    torch.testing.assert_close(pruned[-1], full[k - 1], rtol=0, atol=1e-6)


def test_accurate_mode_averages_the_heads(net):
    x = torch.randn(1, 3, 32, 32)
    expected = torch.stack([torch.sigmoid(h) for h in net(x)]).mean(0)
    torch.testing.assert_close(net.predict_proba(x), expected)


def test_pruning_computes_fewer_flops(net):
    x = torch.randn(1, 3, 64, 64)
    flops = []
    for k in (1, 2, 3):
        with FlopCounterMode(display=False) as counter:
            net(x, prune_level=k)
        flops.append(counter.get_total_flops())
    assert flops[0] < flops[1] < flops[2]


@pytest.mark.parametrize("size", [(1, 1), (17, 33), (100, 7)])
def test_any_input_size_is_padded_and_cropped_back(net, size):
    x = torch.rand(1, 3, *size)
    assert net.predict_proba(x).shape == (1, 3, *size)


def test_forward_rejects_sizes_that_are_not_multiples(net):
    with pytest.raises(ValueError, match="multiples of 8"):
        net(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="prune_level"):
        net(torch.zeros(1, 3, 32, 32), prune_level=4)


def test_gradients_reach_every_head_and_node(net):
    net.train()
    heads = net(torch.randn(2, 3, 32, 32))
    sum(h.mean() for h in heads).backward()
    for name, param in net.named_parameters():
        assert param.grad is not None and torch.any(param.grad != 0), name


def test_dense_skip_inputs_follow_the_unetplusplus_rule():
    net = UNetPlusPlus(widths=(4, 8, 16))
    # X(0,2) sees X(0,0), X(0,1) and up(X(1,1)): 2 * 4 + 8 input channels
    assert net.nodes["x0_2"][0].in_channels == 2 * 4 + 8
    assert net.nodes["x1_1"][0].in_channels == 8 + 16
    assert "x1_2" not in net.nodes  # i + j <= depth


def test_saved_model_rebuilds_alone(net, tmp_path):
    path = tmp_path / "m.safetensors"
    save_model(path, net, {"postprocess": {"seed_threshold": 0.4}})
    loaded, meta = load_model_file(path)
    assert meta["config"]["widths"] == [4, 8, 16, 32]
    assert meta["postprocess"]["seed_threshold"] == 0.4
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(loaded.predict_proba(x), net.predict_proba(x))


def test_bad_model_files_give_clear_errors(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a model")
    with pytest.raises(NucleisegError, match="not a nucleiseg model file"):
        load_model_file(junk)
    with pytest.raises(NucleisegError, match="no such model file"):
        load_model_file(tmp_path / "missing.safetensors")
    with pytest.raises(NucleisegError, match="unknown architecture"):
        build_model({"architecture": "resnet"})


@pytest.mark.parametrize("fused", [False, True])
def test_block_on_parts_equals_block_on_their_concatenation(fused):
    from nucleiseg.models.fuse import fuse_batchnorm
    from nucleiseg.models.unetplusplus import ConvBlock

    torch.manual_seed(1)
    block = ConvBlock(4 + 4 + 8, 4)
    block.train()
    block(torch.randn(2, 16, 12, 12))  # non-trivial BatchNorm running statistics
    block.eval()
    if fused:
        block = fuse_batchnorm(block)
    parts = [torch.randn(2, 4, 12, 12), torch.randn(2, 4, 12, 12), torch.randn(2, 8, 12, 12)]
    torch.testing.assert_close(block.forward_parts(parts), block(torch.cat(parts, dim=1)), rtol=1e-5, atol=1e-5)


def test_network_follows_the_dense_skip_formula(net):
    """The CPU path (sums of convolutions) equals X(i,j) = conv([X(i,0..j-1), up(X(i+1,j-1))]) written out."""
    import torch.nn.functional as F

    x = torch.randn(1, 3, 32, 32)
    X = {(0, 0): net.nodes["x0_0"](x)}
    for i in range(1, net.depth + 1):
        X[i, 0] = net.nodes[f"x{i}_0"](F.max_pool2d(X[i - 1, 0], 2))
    for j in range(1, net.depth + 1):
        for i in range(net.depth - j + 1):
            up = F.interpolate(X[i + 1, j - 1], scale_factor=2.0, mode="nearest")
            X[i, j] = net.nodes[f"x{i}_{j}"](torch.cat([X[i, k] for k in range(j)] + [up], dim=1))
    expected = [net.heads[j - 1](X[0, j]) for j in range(1, net.depth + 1)]
    for got, want in zip(net(x), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
