"""LARE / LADS heads: the math (boxes, losses, sampling) on small random data."""

import math

import pytest

torch = pytest.importorskip("torch")

from vlmtools.heads import lads as LADS  # noqa: E402
from vlmtools.heads import lare as LARE  # noqa: E402


def _toy(n=60, d=16, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    class_emb = torch.nn.functional.normalize(torch.randn(c, d, generator=g), dim=1)
    y = torch.arange(n) % c
    x = torch.nn.functional.normalize(class_emb[y] + 0.3 * torch.randn(n, d, generator=g), dim=1)
    return x, y, class_emb


def test_boxes_are_well_formed_for_any_weights():
    torch.manual_seed(0)
    net = LARE.BoxNet(8, hidden=5)
    for p in net.parameters():  # large random weights: the order must still hold
        torch.nn.init.normal_(p, 0.0, 10.0)
    x = torch.randn(100, 8) * 5
    lo, hi = net(x)
    assert lo.shape == hi.shape == (100, 8)
    assert bool((hi >= lo).all())  # float rounding may make a tiny side 0 next to large centres, never < 0
    torch.nn.init.normal_(net.fc2.weight, 0.0, 1e-3)
    lo, hi = net(torch.randn(100, 8) * 1e-3)
    assert bool((hi - lo > 0).all())


def test_init_centres_boxes_on_images_with_the_given_half_width():
    net = LARE.BoxNet(6)
    LARE.init_box_net(net, 0.05)
    x = torch.randn(4, 6)
    centre, half = net.raw(x)
    assert torch.allclose(centre, x, atol=1e-2)
    assert torch.allclose(half, torch.full_like(half, 0.05), atol=1e-3)


def test_samples_lie_inside_their_box_and_follow_the_seed():
    lo = torch.randn(7, 5)
    hi = lo + torch.rand(7, 5) + 1e-3
    s1 = LARE.sample_boxes(lo, hi, 4, torch.Generator().manual_seed(3))
    s2 = LARE.sample_boxes(lo, hi, 4, torch.Generator().manual_seed(3))
    assert s1.shape == (28, 5) and torch.equal(s1, s2)
    owner = torch.arange(7).repeat_interleave(4)
    assert bool((s1 >= lo[owner]).all() and (s1 <= hi[owner]).all())
    assert LARE.sample_boxes(lo, hi, 0).shape == (0, 5)


def test_volume_losses():
    lo = torch.zeros(3, 4)
    small, large = lo + 0.01, lo + 10.0
    # log-side: bounded below by 0 and smaller for larger boxes
    a, b = LARE.volume_loss(lo, small, "log-side", 1.0), LARE.volume_loss(lo, large, "log-side", 1.0)
    assert 0 <= float(b) < float(a)
    # literal: the study's sum of X+ . X-, averaged over images
    lo2, hi2 = torch.randn(3, 4), torch.randn(3, 4)
    assert math.isclose(float(LARE.volume_loss(lo2, hi2, "literal")), float((lo2 * hi2).sum(1).mean()), rel_tol=1e-6)
    with pytest.raises(ValueError):
        LARE.volume_loss(lo, small, "nope")


def _train(net, loss_fn, steps=150, lr=1e-2):
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss, parts = loss_fn()
        loss.backward()
        opt.step()
    return parts


def test_lare_loss_keeps_corners_in_class_and_literal_volume_grows_boxes():
    x, y, class_emb = _toy()
    side = LARE.embedding_scale(x)
    torch.manual_seed(0)
    net = LARE.BoxNet(x.shape[1])
    LARE.init_box_net(net, side / 2)
    _, before = LARE.lare_loss(net, x, y, class_emb, alpha=0.5, side=side)
    after = _train(net, lambda: LARE.lare_loss(net, x, y, class_emb, alpha=0.5, side=side))
    assert after["cc_plus"] < before["cc_plus"] and after["cc_minus"] < before["cc_minus"]
    assert after["bv"] < before["bv"]
    lo, hi = net(x)
    # the corners of a trained box are classified as the image's class more often than not
    assert float(((hi @ class_emb.T).argmax(1) == y).float().mean()) > 0.8
    # the literal loss, with alpha < 1, only grows the boxes
    torch.manual_seed(0)
    lit = LARE.BoxNet(x.shape[1])
    LARE.init_box_net(lit, side / 2)
    w0 = lit.raw(x)[1].mean().item()
    _train(lit, lambda: LARE.lare_loss(lit, x, y, class_emb, alpha=0.2, volume="literal"), steps=60)
    assert lit.raw(x)[1].mean().item() > 2 * w0


def test_box_stats():
    net = LARE.BoxNet(4)
    LARE.init_box_net(net, 0.5)
    stats = LARE.box_stats(net, torch.randn(5, 4))
    assert stats["log_volume"].shape == (5,)
    assert all(stats["min_side"] <= stats["mean_side"]) and all(stats["mean_side"] <= stats["max_side"])
    assert abs(float(stats["mean_side"][0]) - 1.0) < 0.05


def test_lads_shift_follows_the_text_shift():
    x, y, target = _toy(seed=1)
    g = torch.Generator().manual_seed(2)
    source = torch.nn.functional.normalize(target + 0.5 * torch.randn(target.shape, generator=g), dim=1)
    torch.manual_seed(0)
    net = LADS.AugNet(x.shape[1])
    assert torch.allclose(net(x), x, atol=0.05)  # starts near the identity
    _, before = LADS.lads_loss(net, x, y, source, target)
    after = _train(net, lambda: LADS.lads_loss(net, x, y, source, target, alpha=0.5))
    assert after["da"] < before["da"] and after["da"] < 0.5
    aug = LADS.augment(net, x)
    assert torch.allclose(aug.norm(dim=1), torch.ones(len(x)), atol=1e-5)
    # a shift exactly along the text shift has no alignment loss
    shift = (target - source)[y]
    assert float(LADS.domain_alignment(x, x + 0.1 * shift, shift)) < 1e-5
