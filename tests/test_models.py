"""The gate's maths and the CSG network's single forward pass."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from csgguard.errors import CsgguardError
from csgguard.models import BACKBONES, ClassSpecificGate, CSGNet, ModelConfig


def test_gate_init_density_and_penalty():
    g = ClassSpecificGate(8, 4)
    assert torch.allclose(g.weight, torch.full((8, 4), 0.5))
    assert float(g.density()) == pytest.approx(0.5)
    assert float(g.penalty(0.2).detach()) == pytest.approx(0.5 * 32 - 0.2 * 32)
    assert float(g.penalty(0.6).detach()) == 0.0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-2, 3, allow_nan=False), min_size=12, max_size=12))
def test_normalize_keeps_rows_in_range_with_max_one(values):
    g = ClassSpecificGate(4, 3)
    with torch.no_grad():
        g.weight.copy_(torch.tensor(values).reshape(4, 3))
    g.normalize_()
    w = g.weight.detach()
    assert float(w.min()) >= 0 and float(w.max()) <= 1
    positive_rows = torch.tensor(values).reshape(4, 3).amax(1) > 1e-9
    assert torch.allclose(w.amax(1)[positive_rows], torch.ones(int(positive_rows.sum())))


def test_gating_map_equals_gating_pooled():
    g = ClassSpecificGate(5, 3)
    with torch.no_grad():
        g.weight.uniform_()
    fmap = torch.rand(4, 5, 3, 3)
    y = torch.tensor([0, 2, 1, 2])
    assert torch.allclose(g(fmap, y).mean((2, 3)), g(fmap.mean((2, 3)), y), atol=1e-6)


def _net(gate=True, arch="small_cnn", size=8, ch=1):
    torch.manual_seed(0)
    return CSGNet(ModelConfig(arch=arch, num_classes=10, in_channels=ch, input_size=size, gate=gate,
                              mean=[0.3] * ch, std=[0.3] * ch)).eval()


def test_one_forward_pass_gives_logits_and_pooled():
    net = _net()
    x = torch.rand(6, 1, 8, 8)
    out = net.forward_signals(x)
    assert out.logits.shape == (6, 10) and out.pooled.shape == (6, net.num_filters)
    assert torch.allclose(out.logits, net(x), atol=1e-6)
    assert float(out.pooled.min().detach()) >= 0  # last conv ends in ReLU
    y = torch.arange(6)
    std, csg = net.forward_both(x, y)
    assert torch.allclose(std, out.logits, atol=1e-6)
    assert torch.allclose(csg, net.fc(net.gate(out.pooled, y)), atol=1e-6)
    gl = net.gated_logits(out.pooled)
    manual = torch.stack([net.fc(out.pooled * net.gate.weight[:, c])[:, c] for c in range(10)], 1)
    assert torch.allclose(gl, manual, atol=1e-5)


def test_std_model_has_no_gate():
    net = _net(gate=False)
    assert net.gate is None and not net.has_gate
    with pytest.raises(RuntimeError):
        net.gated_logits(torch.rand(2, net.num_filters))


@pytest.mark.parametrize("arch,size,ch,k", [("small_cnn", 28, 1, 128), ("resnet20", 32, 3, 64),
                                            ("resnet18", 32, 3, 512)])
def test_backbones_by_name(arch, size, ch, k):
    net = _net(arch=arch, size=size, ch=ch)
    x = torch.rand(2, ch, size, size)
    out = net.forward_signals(x)
    assert out.pooled.shape == (2, k)
    # the taps come from the same pass: the last map is the plain forward's, taps are shallow -> deep
    assert torch.allclose(out.logits, net(x), atol=1e-5)
    assert len(out.taps) >= 3 and all(t.shape[0] == 2 and t.dim() == 2 for t in out.taps)
    widths = [t.shape[1] for t in out.taps]
    assert widths == sorted(widths) and widths[-1] <= k
    assert set(BACKBONES) >= {"small_cnn", "resnet20", "resnet18", "resnet50"}


def test_unknown_architecture():
    with pytest.raises(CsgguardError, match="unknown architecture 'vgg99'"):
        _net(arch="vgg99")


@pytest.mark.parametrize("arch, k", [("resnet18", 512), ("resnet50", 2048)])
def test_fixed_width_backbones_reject_another_width(arch, k):
    from csgguard.models.backbones import build_backbone

    with pytest.raises(CsgguardError, match="fixed width"):
        build_backbone(arch, in_channels=3, input_size=32, width=64)
    assert build_backbone(arch, in_channels=3, input_size=32, width=k).out_channels == k
