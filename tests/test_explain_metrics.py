"""The saliency metrics' contracts that a reported mIoU, insertion or deletion figure rests on, at their edges:
what counts as salient, how the pointing ceiling treats odd lattices and masks, RISE's kernel and step at
small sizes, and the errors a user sees. (Written where mutation testing showed the suite would not notice
a one-line change; see tests/MUTANTS.md.)"""

import numpy as np
import pytest
import torch

from vlmtools.explain import metrics as M


def test_threshold_text_is_read_as_a_user_types_it():
    assert M.parse_threshold(" mean + std ") == "mean+std"
    assert M.parse_threshold("0.5") == "0.5" and M.parse_threshold(" 0.25 ") == "0.25"
    assert M.binarize(np.array([0.3, 0.6]), M.parse_threshold("0.5")).tolist() == [False, True]
    # 1 would ask for grey > 255: nothing could ever be salient
    for bad in ("1", "1.0", "0", "-0.2", "abc", "mean"):
        with pytest.raises(ValueError, match=r"--threshold .*expected a number in \(0, 1\)"):
            M.parse_threshold(bad)


def test_a_flat_map_marks_nothing_salient_under_mean_plus_std():
    # a method that found nothing (all zeros) must not light up the whole image
    assert not M.binarize(np.zeros((4, 4), np.float32), "mean+std").any()
    assert M.iou(np.zeros((4, 4)), np.ones((4, 4), bool), "mean+std") == 0.0


def test_iou_uses_the_threshold_it_is_given():
    m = np.array([[0.1, 0.6], [0.8, 0.95]], np.float32)
    mask = np.array([[0, 0], [0, 1]], bool)
    assert M.iou(m, mask) == pytest.approx(1 / 3)          # grey > 127: three pixels
    assert M.iou(m, mask, "0.9") == 1.0                     # grey > 229: only the last one


def test_map_values_outside_0_1_saturate_never_wrap_around():
    # an unnormalised map (a negative Grad-CAM value, a score above 1) clips to black/white, as PIL would save it
    assert M.grey8(np.array([-0.5, 0.0, 0.5, 1.0, 1.5])).tolist() == [0, 0, 127, 255, 255]
    assert M.binarize(np.array([-3.0, 2.0])).tolist() == [False, True]


def test_region_iou_refuses_maps_and_masks_of_different_sizes():
    with pytest.raises(ValueError, match=r"map \(2, 2\) and mask \(3, 3\) differ in size"):
        M.region_iou(np.ones((2, 2), bool), np.ones((3, 3), bool))


def test_lattice_ceiling_edges():
    # an empty mask: the empty map matches it exactly
    assert M.lattice_ceiling(np.zeros((4, 4), bool), (2, 2)) == 1.0
    # one pixel in a 2x2 cell of a 4x4 image: the best map lights that cell, IoU 1/4
    one = np.zeros((4, 4), bool)
    one[0, 0] = True
    assert M.lattice_ceiling(one, (2, 2)) == pytest.approx(1 / 4)
    # a mask read from a PNG (0/255 integers) is the same mask as its booleans
    assert M.lattice_ceiling(one.astype(np.uint8) * 255, (2, 2)) == pytest.approx(1 / 4)
    # a lattice of 1 row x 4 columns is not 4 x 4: the column holding the pixel has 4 pixels
    assert M.lattice_ceiling(one, (1, 4)) == pytest.approx(1 / 4)
    assert M.lattice_ceiling(one, (4, 1)) == pytest.approx(1 / 4)
    tall = np.zeros((4, 4), bool)
    tall[:, 0] = True  # the first column: one whole cell at 1 x 4; a quarter of every row cell at 4 x 1
    assert M.lattice_ceiling(tall, (1, 4)) == 1.0
    assert M.lattice_ceiling(tall, (4, 1)) == pytest.approx(1 / 4)


def _brute_ceiling(mask, lattice):
    """Best IoU over every union of lattice cells (2^cells maps): the definition, for small lattices."""
    H, W = mask.shape
    gh, gw = lattice
    cell = ((np.arange(H) * gh) // H)[:, None] * gw + ((np.arange(W) * gw) // W)[None, :]
    best = 0.0
    for bits in range(1, 1 << (gh * gw)):
        on = np.array([(bits >> c) & 1 for c in range(gh * gw)], bool)[cell]
        best = max(best, (on & mask).sum() / (on | mask).sum())
    return best


@pytest.mark.parametrize("shape, lattice", [((5, 7), (2, 3)), ((3, 3), (2, 2)), ((6, 4), (4, 3)), ((3, 5), (2, 4))])
def test_lattice_ceiling_equals_the_brute_force_best_union_of_cells(shape, lattice):
    """Cells of unequal size too (H or W not a multiple of the lattice), where the rank by share matters."""
    rng = np.random.default_rng(sum(shape) * 10 + sum(lattice))
    for _ in range(5):
        mask = rng.random(shape) < 0.4
        if mask.any():
            assert M.lattice_ceiling(mask, lattice) == pytest.approx(_brute_ceiling(mask, lattice), abs=1e-12)


def test_gkern_defaults_sizes_and_errors():
    assert M.gkern().shape == (11, 11) and np.array_equal(M.gkern(), M.gkern(11, 5.0))
    assert M.gkern(1, 5.0).tolist() == [[1.0]]        # a one-pixel window holds the whole (reflected) kernel
    for klen in (2, 3, 11):
        assert M.gkern(klen, 2.0).sum() == pytest.approx(1.0, abs=1e-6)  # reflection keeps all the mass
    for klen, nsig in ((0, 5.0), (3, 0.0), (3, -1.0)):
        with pytest.raises(ValueError, match="klen >= 1 and nsig > 0"):
            M.gkern(klen, nsig)


def test_blur_uses_the_kernel_given_and_keeps_the_input_dtype():
    x = torch.rand(1, 3, 9, 9)
    assert torch.equal(M.blur(x, np.ones((1, 1), np.float32)), x)  # a 1x1 unit kernel leaves the image as it is
    box = M.blur(x, np.full((3, 3), 1 / 9, np.float32))
    assert box[0, :, 4, 4].tolist() == pytest.approx(x[0, :, 3:6, 3:6].mean((1, 2)).tolist(), abs=1e-6)
    double = M.blur(x.double())
    assert double.dtype == torch.float64 and torch.allclose(double.float(), M.blur(x), atol=1e-6)


def test_insertion_starts_from_the_canvas_of_the_kernel_given():
    x = torch.rand(1, 3, 6, 6)
    seen = []

    def score(images):
        seen.append(images.clone())
        return images.mean((1, 2, 3))

    M.causal_curve(x, np.random.default_rng(0).random((6, 6)), score, "insertion", step=36, kernel=np.ones((1, 1)))
    assert torch.equal(seen[0][0], x[0])  # identity blur: the canvas is the image itself


def test_step_of_one_pixel_and_the_default_step():
    x = torch.rand(1, 3, 4, 5)
    xs, ys = M.causal_curve(x, np.arange(20.0).reshape(4, 5), lambda im: im.sum((1, 2, 3)), "deletion", step=1)
    assert len(xs) == len(ys) == 21 and ys[-1] == 0.0
    assert xs.dtype == np.float64 and ys.dtype == np.float64
    assert [M.default_step(n) for n in (1, 100, 224, 225, 224 * 224, 224 * 224 + 1)] == [1, 1, 1, 2, 224, 225]


@pytest.mark.parametrize("call, message", [
    (lambda x: M.causal_curve(x, np.zeros((4, 4)), None, "sideways"), "sideways"),
    (lambda x: M.causal_curve(x, np.zeros((3, 4)), None, "deletion"), r"saliency \(3, 4\) is not the input's size \(4, 4\)"),
    (lambda x: M.causal_curve(x, np.zeros((4, 4)), None, "deletion", step=0), "step must be at least 1"),
    (lambda x: M.auc([0.5]), "auc needs at least two scores"),
])
def test_causal_metric_errors_say_what_is_wrong(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.zeros(1, 3, 4, 4))
