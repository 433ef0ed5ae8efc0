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


@pytest.mark.parametrize("form", LARE.BOX_FORMS)
def test_boxes_are_well_formed_for_any_weights(form):
    torch.manual_seed(0)
    net = LARE.BoxNet(8, hidden=5, form=form)
    for p in net.parameters():  # large random weights: the order must still hold
        torch.nn.init.normal_(p, 0.0, 10.0)
    x = torch.randn(100, 8) * 5
    lo, hi = net(x)
    assert lo.shape == hi.shape == (100, 8)
    assert bool((hi >= lo).all())  # float rounding may make a tiny side 0 next to large centres, never < 0
    if form == "contain":  # every box holds its own image
        assert bool((lo <= x).all() and (x <= hi).all())
    torch.nn.init.normal_(net.fc2.weight, 0.0, 1e-3)
    lo, hi = net(torch.randn(100, 8) * 1e-3)
    assert bool((hi - lo > 0).all())


@pytest.mark.parametrize("form", LARE.BOX_FORMS)
def test_init_centres_boxes_on_images_with_the_given_half_width(form):
    net = LARE.BoxNet(6, form=form)
    LARE.init_box_net(net, 0.05)
    x = torch.randn(4, 6)
    lo, hi = net(x)
    assert torch.allclose(lo, x - 0.05, atol=1e-2) and torch.allclose(hi, x + 0.05, atol=1e-2)


def test_samples_lie_inside_their_box_and_follow_the_seed():
    lo = torch.randn(7, 5)
    hi = lo + torch.rand(7, 5) + 1e-3
    s1 = LARE.sample_boxes(lo, hi, 4, torch.Generator().manual_seed(3))
    s2 = LARE.sample_boxes(lo, hi, 4, torch.Generator().manual_seed(3))
    assert s1.shape == (28, 5) and torch.equal(s1, s2)
    owner = torch.arange(7).repeat_interleave(4)
    assert bool((s1 >= lo[owner]).all() and (s1 <= hi[owner]).all())
    assert LARE.sample_boxes(lo, hi, 0).shape == (0, 5)


def test_volume_losses_equal_their_definitions():
    g = torch.Generator().manual_seed(0)
    lo = torch.randn(3, 4, generator=g)
    sides = torch.rand(3, 4, generator=g) + 0.1
    hi, b = lo + sides, 0.7
    # log-side: per image the sum over dimensions of (log side - log b)^2, averaged over images
    want = sum(sum((math.log(float(sides[i, j])) - math.log(b)) ** 2 for j in range(4)) for i in range(3)) / 3
    assert math.isclose(float(LARE.volume_loss(lo, hi, "log-side", b)), want, rel_tol=1e-5)
    # ... whose optimum is finite: every side at b, and both smaller and larger boxes cost more
    at = {k: float(LARE.volume_loss(lo, lo + k * b, "log-side", b)) for k in (0.5, 1.0, 2.0, 100.0)}
    assert at[1.0] < 1e-10 < at[0.5] and at[1.0] < at[2.0] < at[100.0]
    # literal: the study's eq. 1, X+ . X- (here averaged over images); it keeps falling as boxes grow
    assert math.isclose(float(LARE.volume_loss(lo, hi, "literal")),
                        sum(float(lo[i] @ hi[i]) for i in range(3)) / 3, rel_tol=1e-5)
    centre = torch.zeros(1, 4)
    assert float(LARE.volume_loss(centre - 10, centre + 10, "literal")) < float(
        LARE.volume_loss(centre - 1, centre + 1, "literal"))
    with pytest.raises(ValueError):
        LARE.volume_loss(lo, hi, "nope")


def test_lare_loss_equals_the_study_equation_5():
    """L = (1 - a) L_BV + (a/3)(CE at X+ + CE at X- + CE at the midpoint) of softmax(s * point . T), restated
    with explicit softmaxes on fixed tensors."""
    x, y, class_emb = _toy(n=9, d=5, c=3)
    torch.manual_seed(1)
    net = LARE.BoxNet(5, hidden=4)
    torch.nn.init.normal_(net.fc2.weight, 0.0, 0.5)
    with torch.no_grad():
        lo, hi = (t.double() for t in net(x))

    def ce(points, scale):  # -log softmax(s * points . T)[y], with the max taken out so that exp cannot overflow
        logits = scale * points @ class_emb.double().T
        top = logits.max(1, keepdim=True).values
        log_p = logits - top - torch.log(torch.exp(logits - top).sum(1, keepdim=True))
        return float(-log_p[torch.arange(len(y)), y].mean())

    for alpha, scale in ((0.5, 1.0), (0.2, 100.0)):
        bv = float(((torch.log(hi - lo) - math.log(0.3)) ** 2).sum(1).mean())
        want = (1 - alpha) * bv + alpha / 3 * (ce(hi, scale) + ce(lo, scale) + ce((lo + hi) / 2, scale))
        got, parts = LARE.lare_loss(net, x, y, class_emb, alpha=alpha, side=0.3, logit_scale=scale)
        assert math.isclose(float(got), want, rel_tol=1e-5)
        assert math.isclose(parts["cc_mid"], ce((lo + hi) / 2, scale), rel_tol=1e-5)
    assert LARE.DEFAULT_LOGIT_SCALE == 1.0  # the study's unscaled softmax S[X . T]


def _train(net, loss_fn, steps=150, lr=1e-2):
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss, parts = loss_fn()
        loss.backward()
        opt.step()
    return parts


def _trained_boxes(form, volume, scale, class_emb, steps=60):
    x, y, _ = _toy(n=60, d=16, c=3)
    side = LARE.embedding_scale(x)
    torch.manual_seed(0)
    net = LARE.BoxNet(x.shape[1], hidden=16, form=form)
    LARE.init_box_net(net, side / 2)
    _train(net, lambda: LARE.lare_loss(net, x, y, class_emb, alpha=0.5, volume=volume, side=side,
                                       logit_scale=scale), steps=steps)
    with torch.no_grad():
        lo, hi = net(x)
    return x, lo, hi, side


def test_default_boxes_stay_where_their_images_are():
    """The defining effect of the default (contain form, log-side volume): trained on class texts that say
    nothing about the images, every box still holds its image and its sides stay near b. The round-2 form
    (a free centre) with CLIP's logit scale carries the boxes off their images along the text directions:
    the collapse that took out-of-domain accuracy from 96 to 69 % on the offline world."""
    g = torch.Generator().manual_seed(5)
    meaningless = torch.nn.functional.normalize(torch.randn(3, 16, generator=g), dim=1)
    x, lo, hi, side = _trained_boxes("contain", "log-side", LARE.DEFAULT_LOGIT_SCALE, meaningless)
    assert bool((lo <= x).all() and (x <= hi).all())
    sides = hi - lo
    assert 0.5 * side < float(sides.mean()) < 2 * side and float(sides.max()) < 5 * side
    shift = float(((lo + hi) / 2 - x).norm(dim=1).mean())
    x, lo, hi, _ = _trained_boxes("centre", "log-side", 100.0, meaningless)
    assert not bool((lo <= x).all() and (x <= hi).all())
    old_shift = float(((lo + hi) / 2 - x).norm(dim=1).mean())
    assert old_shift > 1.0 > 3 * shift  # unit-norm images: the old boxes left them behind


def test_lare_loss_keeps_corners_in_class_and_literal_volume_grows_boxes():
    x, y, class_emb = _toy()
    side = LARE.embedding_scale(x)
    torch.manual_seed(0)
    net = LARE.BoxNet(x.shape[1])
    LARE.init_box_net(net, side)
    _, before = LARE.lare_loss(net, x, y, class_emb, alpha=0.5, side=side, logit_scale=10.0)
    after = _train(net, lambda: LARE.lare_loss(net, x, y, class_emb, alpha=0.5, side=side, logit_scale=10.0))
    assert after["cc_plus"] < before["cc_plus"] and after["cc_minus"] < before["cc_minus"]
    assert after["bv"] < before["bv"]
    lo, hi = net(x)
    # the corners of a trained box are classified as the image's class more often than not
    assert float(((hi @ class_emb.T).argmax(1) == y).float().mean()) > 0.8
    # the literal loss, with alpha < 1, only grows the boxes
    torch.manual_seed(0)
    lit = LARE.BoxNet(x.shape[1])
    LARE.init_box_net(lit, side / 2)
    lo, hi = lit(x)
    w0 = float((hi - lo).mean())
    _train(lit, lambda: LARE.lare_loss(lit, x, y, class_emb, alpha=0.2, volume="literal"), steps=60)
    lo, hi = lit(x)
    assert float((hi - lo).mean()) > 2 * w0


def test_old_head_files_keep_their_box_form():
    # a round-2 head file has no "box" in its config: its f_Box is read back in the form it was trained in
    assert LARE.LareHead(4, 2, 3).aug.form == "centre"
    assert LARE.LareHead(4, 2, 3, box="contain").aug.form == "contain"


def test_box_stats():
    net = LARE.BoxNet(4)
    LARE.init_box_net(net, 0.5)
    stats = LARE.box_stats(net, torch.randn(5, 4))
    assert stats["log_volume"].shape == (5,)
    assert all(stats["min_side"] <= stats["mean_side"]) and all(stats["mean_side"] <= stats["max_side"])
    assert abs(float(stats["mean_side"][0]) - 1.0) < 0.05


def test_lads_terms_equal_the_authors_definitions():
    """Restated from lisadunlap/LADS (08e812e) on fixed tensors: Noop's per-class text difference, the
    Directional MLP (Linear, ReLU, Linear; no residual), directional_loss_builder's per-row 1 - dot/(|a||b|),
    get_class_logits (normalized output . class text, no scale), CrossEntropyLoss(weight=get_counts(labels))
    and alpha * directional + (1 - alpha) * class consistency."""
    g = torch.Generator().manual_seed(7)
    n, d, c = 7, 5, 3
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    y = torch.tensor([0, 1, 2, 2, 0, 0, 1])
    source, target, cc_emb = (torch.randn(c, d, generator=g) for _ in range(3))
    net = LADS.AugNet(d, hidden=4)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    out = net.fc2.weight @ torch.clamp(net.fc1.weight @ x.T + net.fc1.bias[:, None], min=0) + net.fc2.bias[:, None]
    out = out.T
    assert torch.allclose(net(x), out, atol=1e-6)

    def unit(v):
        return v / v.norm(dim=-1, keepdim=True)

    diff = unit(unit(target) - unit(source))
    assert torch.allclose(LADS.text_directions(source, target), diff, atol=1e-6)
    directional = sum(1 - torch.dot(out[i] - x[i], diff[y[i]]) / ((out[i] - x[i]).norm() * diff[y[i]].norm())
                      for i in range(n)) / n
    counts = torch.tensor([3.0, 2.0, 2.0])
    weights = (1 / counts) / (1 / counts).max()
    assert torch.allclose(LADS.class_weights(y, c), weights)
    logits = unit(out) @ cc_emb.T
    log_p = logits - torch.log(torch.exp(logits).sum(1, keepdim=True))
    consistency = sum(-weights[y[i]] * log_p[i, y[i]] for i in range(n)) / weights[y].sum()
    for alpha in (0.5, 0.8):
        loss, parts = LADS.lads_loss(net, x, y, diff, cc_emb, weights, alpha=alpha)
        assert math.isclose(parts["dir"], float(directional), rel_tol=1e-5)
        assert math.isclose(parts["cc"], float(consistency), rel_tol=1e-5)
        assert math.isclose(float(loss), float(alpha * directional + (1 - alpha) * consistency), rel_tol=1e-5)
    assert LADS.AUTHORS["hidden"] == LADS.AugNet(d).hidden == 384
    scaled = unit(out) @ cc_emb.T * 10  # --logit-scale multiplies the cosines of the class-consistency term
    log_p = scaled - torch.log(torch.exp(scaled).sum(1, keepdim=True))
    consistency = sum(-weights[y[i]] * log_p[i, y[i]] for i in range(n)) / weights[y].sum()
    _, parts = LADS.lads_loss(net, x, y, diff, cc_emb, weights, logit_scale=10.0)
    assert math.isclose(parts["cc"], float(consistency), rel_tol=1e-5)


def test_lads_class_weights_are_the_authors_inverse_counts():
    """EmbeddingDataset.get_counts: w_c = min count / n_c over the classes present; absent classes weigh 0."""
    y = torch.tensor([0, 1, 1, 1, 0, 1, 1])  # counts 2, 5; classes 2 and 3 have no rows
    assert torch.allclose(LADS.class_weights(y, 4), torch.tensor([1.0, 0.4, 0.0, 0.0]))
    assert torch.allclose(LADS.class_weights(torch.tensor([1, 0, 0]), 2), torch.tensor([0.5, 1.0]))


def test_lads_ensemble_is_the_mean_of_probe_and_zero_shot_probabilities():
    g = torch.Generator().manual_seed(3)
    head = LADS.LadsHead(6, 4, 8, ensemble=True)
    with torch.no_grad():
        head.zeroshot.copy_(torch.nn.functional.normalize(torch.randn(4, 6, generator=g), dim=1))
    x = torch.randn(5, 6, generator=g) * 3
    nx = x / x.norm(dim=1, keepdim=True)
    want = (torch.softmax(head.fc(nx), 1) + torch.softmax(100 * nx @ head.zeroshot.T, 1)) / 2
    assert torch.allclose(torch.softmax(head(x), 1), want, atol=1e-6)
    assert torch.allclose(torch.exp(head(x)), want, atol=1e-6)  # forward: the log of that mean itself
    # the validation metric reads the probe alone, not the ensemble (the authors pick the epoch on it)
    y = head.probe(x).argmax(1)
    assert LADS.balanced_accuracy(head, x, y) == 1.0 and LADS.balanced_accuracy(head.probe, x, y) == 1.0
    assert math.isnan(LADS.balanced_accuracy(head, x[:0], y[:0]))
    plain = LADS.LadsHead(6, 4, 8)
    assert "zeroshot" not in dict(plain.named_buffers())
    assert torch.allclose(plain(x), plain.fc(nx), atol=1e-6)  # the probe reads normalized inputs


def test_lads_augmenter_follows_the_text_shift():
    x, y, target = _toy(seed=1)
    g = torch.Generator().manual_seed(2)
    source = torch.nn.functional.normalize(target + 0.5 * torch.randn(target.shape, generator=g), dim=1)
    directions = LADS.text_directions(source, target)
    weights = LADS.class_weights(y, 3)
    torch.manual_seed(0)
    net = LADS.AugNet(x.shape[1], hidden=32)
    _, before = LADS.lads_loss(net, x, y, directions, target, weights)
    after = _train(net, lambda: LADS.lads_loss(net, x, y, directions, target, weights), steps=100)
    assert after["dir"] < before["dir"] and after["dir"] < 0.5
    aug = LADS.augment(net, x)
    assert torch.allclose(aug.norm(dim=1), torch.ones(len(x)), atol=1e-5)
    # a shift exactly along the text direction has no directional loss
    assert float(LADS.directional_loss(x, x + 0.1 * directions[y], directions[y])) < 1e-5


def test_balanced_accuracy_and_the_first_of_tied_epochs():
    from vlmtools.heads.loop import FitOptions, fit

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return x

    y = torch.tensor([0, 0, 0, 1])
    logits = torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]])  # class 0: 2/3 right, class 1: 1/1
    assert math.isclose(LADS.balanced_accuracy(Fixed(), logits, y), (2 / 3 + 1) / 2, rel_tol=1e-6)
    seen = []

    def metric(m, a, b):  # epochs 2 and 4 tie for the best (a 6th call: the final train metric)
        seen.append(None)
        return [0.1, 0.5, 0.2, 0.5, 0.3, 0.0][len(seen) - 1]

    opts = FitOptions(epochs=5, patience=0, device="cpu")
    data = (torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]))
    loss = lambda m, a, b: (m.w ** 2).sum() + a.sum() * 0  # noqa: E731
    assert fit(Fixed(), data, data, opts, loss_fn=loss, metric_fn=metric, ties="first").best_epoch == 2
    seen.clear()
    assert fit(Fixed(), data, data, opts, loss_fn=loss, metric_fn=metric).best_epoch == 4
