"""Augmentation presets, and the on-device path against torchvision: same parameter distributions
(statistical tests) and same op formulas (numerical tests)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from scipy import stats

from lightning_ssl.datamodules.augmentations import ViewConfig, cpu_view_transform, preset
from lightning_ssl.datamodules.gpu_augment import GPUAugment, ViewAugment, sample_crop_boxes

N = 20000  # samples per statistical test


# ------------------------------------------------------------------------------------- presets
def test_presets_follow_the_papers():
    simclr = preset("simclr", 224)
    assert simclr[0] == simclr[1]
    v = simclr[0]
    assert (v.size, v.scale, v.flip_p, v.jitter_p, v.grayscale_p, v.blur_p) == (224, (0.08, 1.0), 0.5, 0.8, 0.2, 0.5)
    assert v.jitter == pytest.approx((0.8, 0.8, 0.8, 0.2)) and v.blur_kernel == 23 and v.blur_sigma == (0.1, 2.0)
    assert preset("simclr", 32, strength=0.5)[0].jitter == pytest.approx((0.4, 0.4, 0.4, 0.1))
    assert preset("simclr", 32, small_image=True)[0].blur_p == 0.0

    b1, b2 = preset("byol", 224)
    assert (b1.blur_p, b2.blur_p, b1.solarize_p, b2.solarize_p) == (1.0, 0.1, 0.0, 0.2)
    assert b1.jitter == pytest.approx((0.4, 0.4, 0.2, 0.1)) and b1.jitter_p == 0.8 and b1.grayscale_p == 0.2
    assert [v.blur_p for v in preset("byol", 32, small_image=True)] == [0.0, 0.0]
    assert preset("byol", 32, small_image=True)[1].solarize_p == 0.2

    m1, m2 = preset("moco_v1", 224)[0], preset("moco_v2", 224)[0]
    assert (m1.scale, m1.jitter_p, m1.blur_p, m1.grayscale_p) == ((0.2, 1.0), 1.0, 0.0, 0.2)
    assert m1.jitter == pytest.approx((0.4, 0.4, 0.4, 0.4))
    assert (m2.scale, m2.jitter_p, m2.blur_p) == ((0.2, 1.0), 0.8, 0.5) and m2.jitter == pytest.approx(
        (0.4, 0.4, 0.4, 0.1)
    )

    s = preset("seed")[0]
    assert (s.size, s.scale, s.jitter_p, s.grayscale_p) == (512, (0.3, 1.0), 0.8, 0.0)
    assert s.jitter == pytest.approx((0.4, 0.4, 0.1, 0.0))
    with pytest.raises(ValueError, match="unknown augmentation 'simsiam'"):
        preset("simsiam")
    with pytest.raises(ValueError, match="blur_p"):
        ViewConfig(blur_p=1.5)


def _find(compose, cls):
    for t in compose.transforms:
        if isinstance(t, cls):
            return t
        if isinstance(t, T.RandomApply) and isinstance(t.transforms[0], cls):
            return t
    return None


def test_cpu_transform_is_built_from_the_config():
    cfg = preset("byol", 64)[1]
    tf = cpu_view_transform(cfg)
    rrc = _find(tf, T.RandomResizedCrop)
    assert (
        tuple(rrc.size) == (64, 64) and tuple(rrc.scale) == cfg.scale and tuple(rrc.ratio) == pytest.approx(cfg.ratio)
    )
    jitter = _find(tf, T.ColorJitter)
    assert jitter.p == cfg.jitter_p
    cj = jitter.transforms[0]
    assert cj.brightness == pytest.approx((0.6, 1.4)) and cj.saturation == pytest.approx((0.8, 1.2))
    assert cj.hue == pytest.approx((-0.1, 0.1))
    assert _find(tf, T.RandomGrayscale).p == cfg.grayscale_p
    blur = _find(tf, T.GaussianBlur)
    assert blur.p == cfg.blur_p and tuple(blur.transforms[0].kernel_size) == (cfg.blur_kernel,) * 2
    assert _find(tf, T.RandomSolarize).p == cfg.solarize_p
    assert _find(cpu_view_transform(preset("byol", 64)[0]), T.RandomSolarize) is None


# ------------------------------------------------------- on-device parameters: same distributions
def _ks_same(a, b, alpha=1e-3) -> bool:
    return stats.ks_2samp(np.asarray(a), np.asarray(b)).pvalue > alpha


def _rate_close(mask: torch.Tensor, p: float) -> bool:
    rate = mask.float().mean().item()
    return abs(rate - p) <= 5 * math.sqrt(max(p * (1 - p), 1e-12) / mask.numel()) + 1e-12


def _cpu_crop_boxes(height, width, scale, ratio, n):
    img = torch.empty(1, height, width)
    return np.array([T.RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)], dtype=float)


@pytest.mark.parametrize("height,width,scale", [(375, 500, (0.08, 1.0)), (32, 32, (0.2, 1.0)), (100, 400, (0.08, 1.0))])
def test_crop_boxes_follow_torchvision(height, width, scale):
    ratio = (3 / 4, 4 / 3)
    g = torch.Generator().manual_seed(0)
    ours = sample_crop_boxes(torch.full((N,), height), torch.full((N,), width), scale, ratio, g).numpy()
    ref = _cpu_crop_boxes(height, width, scale, ratio, 4000)
    for fn in (
        lambda b: b[:, 2] * b[:, 3] / (height * width),  # area fraction
        lambda b: np.log(b[:, 3] / b[:, 2]),  # log aspect ratio
        lambda b: (b[:, 0] + b[:, 2] / 2) / height,  # center row
        lambda b: (b[:, 1] + b[:, 3] / 2) / width,
    ):  # center column
        assert _ks_same(fn(ours), fn(ref))
    assert (ours[:, 0] >= 0).all() and (ours[:, 0] + ours[:, 2] <= height).all()
    assert (ours[:, 1] >= 0).all() and (ours[:, 1] + ours[:, 3] <= width).all()


def test_crop_test_detects_a_different_scale():
    """The KS test above has the power to see a wrong crop distribution."""
    g = torch.Generator().manual_seed(0)
    ours = sample_crop_boxes(torch.full((N,), 375), torch.full((N,), 500), (0.2, 1.0), (3 / 4, 4 / 3), g).numpy()
    ref = _cpu_crop_boxes(375, 500, (0.08, 1.0), (3 / 4, 4 / 3), 4000)
    assert not _ks_same(ours[:, 2] * ours[:, 3], ref[:, 2] * ref[:, 3])


@pytest.mark.parametrize("name,view", [("simclr", 0), ("byol", 0), ("byol", 1), ("moco_v1", 0), ("seed", 0)])
def test_on_device_parameters_follow_the_cpu_preset(name, view):
    cfg = preset(name, 64)[view]
    tf = cpu_view_transform(cfg)
    g = torch.Generator().manual_seed(1)
    params = ViewAugment(cfg).sample_params(torch.full((N,), 64), torch.full((N,), 64), generator=g)

    # apply probabilities read from the CPU pipeline
    jitter = _find(tf, T.ColorJitter)
    cpu_p = {
        "flip": _find(tf, T.RandomHorizontalFlip).p,
        "jitter": jitter.p if jitter is not None else 0.0,
        "grayscale": getattr(_find(tf, T.RandomGrayscale), "p", 0.0),
        "blur": getattr(_find(tf, T.GaussianBlur), "p", 0.0),
        "solarize": getattr(_find(tf, T.RandomSolarize), "p", 0.0),
    }
    for key, p in cpu_p.items():
        assert _rate_close(params[key], p), (key, params[key].float().mean().item(), p)

    # jitter factors against torchvision's ColorJitter.get_params on the CPU pipeline's ranges
    if jitter is not None:
        cj = jitter.transforms[0]
        ref = [T.ColorJitter.get_params(cj.brightness, cj.contrast, cj.saturation, cj.hue) for _ in range(4000)]
        for k, key in enumerate(("brightness", "contrast", "saturation", "hue")):
            cpu_values = [r[k + 1] for r in ref]
            if cpu_values[0] is None:  # op off on the CPU: must be the identity on the device
                assert torch.all(params[key] == (0.0 if key == "hue" else 1.0))
            else:
                assert _ks_same(params[key].numpy(), cpu_values), key
        # the four ops in a uniformly random order: each op at each position 1/4 of the time
        for pos in range(4):
            counts = torch.bincount(params["order"][:, pos], minlength=4).numpy()
            assert stats.chisquare(counts).pvalue > 1e-3
    blur = _find(tf, T.GaussianBlur)
    if blur is not None:
        smin, smax = blur.transforms[0].sigma
        assert _ks_same(params["sigma"].numpy(), np.random.default_rng(0).uniform(smin, smax, 4000))


def test_rate_test_detects_a_wrong_probability():
    g = torch.Generator().manual_seed(0)
    params = ViewAugment(preset("simclr", 32)[0].replace(grayscale_p=0.25)).sample_params(
        torch.full((N,), 32), torch.full((N,), 32), generator=g
    )
    assert not _rate_close(params["grayscale"], 0.2)


# ------------------------------------------------------------- on-device ops: same formulas
def _identity_params(n, size, **overrides):
    p = {
        "box": torch.tensor([[0.0, 0.0, size, size]] * n),
        "flip": torch.zeros(n, dtype=torch.bool),
        "jitter": torch.zeros(n, dtype=torch.bool),
        "order": torch.arange(4).repeat(n, 1),
        "brightness": torch.ones(n),
        "contrast": torch.ones(n),
        "saturation": torch.ones(n),
        "hue": torch.zeros(n),
        "grayscale": torch.zeros(n, dtype=torch.bool),
        "blur": torch.zeros(n, dtype=torch.bool),
        "sigma": torch.ones(n),
        "solarize": torch.zeros(n, dtype=torch.bool),
    }
    p.update(overrides)
    return p


def _raw(view: ViewAugment, x, params):
    """Apply and undo the normalization, to compare with torchvision on [0, 1] images."""
    n = x.shape[0]
    sizes = torch.full((n,), x.shape[-1])
    return view.apply(x.clone(), sizes, sizes, params) * view.std + view.mean


def test_on_device_ops_match_torchvision_functional():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 24, 24)
    n = 3
    view = ViewAugment(ViewConfig(size=24, blur_kernel=5))
    on = torch.ones(n, dtype=torch.bool)
    f = torch.tensor([0.6, 1.0, 1.7])
    h = torch.tensor([-0.3, 0.05, 0.45])
    for k, (key, factors, ref) in enumerate(
        [
            ("brightness", f, TF.adjust_brightness),
            ("contrast", f, TF.adjust_contrast),
            ("saturation", f, TF.adjust_saturation),
            ("hue", h, TF.adjust_hue),
        ]
    ):
        order = torch.tensor([k, *[j for j in range(4) if j != k]]).repeat(n, 1)
        out = _raw(view, x, _identity_params(n, 24, jitter=on, order=order, **{key: factors}))
        expected = torch.stack([ref(x[i], float(factors[i])) for i in range(n)])
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=0, msg=key)
    out = _raw(view, x, _identity_params(n, 24, grayscale=on))
    torch.testing.assert_close(out, TF.rgb_to_grayscale(x, 3), atol=1e-5, rtol=0)
    sig = torch.tensor([0.3, 1.0, 2.0])
    out = _raw(view, x, _identity_params(n, 24, blur=on, sigma=sig))
    expected = torch.stack([TF.gaussian_blur(x[i], [5, 5], [float(sig[i])] * 2) for i in range(n)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    out = _raw(view, x, _identity_params(n, 24, solarize=on))
    torch.testing.assert_close(out, TF.solarize(x, 0.5), atol=1e-5, rtol=0)


def test_crop_and_flip_match_torchvision_resized_crop():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 40, 40)
    view = ViewAugment(ViewConfig(size=32))
    box = torch.tensor([[5.0, 3.0, 20.0, 30.0], [0.0, 10.0, 40.0, 16.0]])
    flip = torch.tensor([False, True])
    out = _raw(view, x, _identity_params(2, 40, box=box, flip=flip))
    for i in range(2):
        t, left, hh, ww = (int(v) for v in box[i])
        ref = TF.resized_crop(x[i], t, left, hh, ww, [32, 32], antialias=False)
        ref = TF.hflip(ref) if flip[i] else ref
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_crop_is_drawn_in_original_pixels_of_a_squashed_image():
    """A 40x80 image shipped as 40x40: a crop box in original pixels equals cropping the original."""
    torch.manual_seed(0)
    original = torch.rand(1, 3, 40, 80)
    shipped = torch.nn.functional.interpolate(original, size=(40, 40), mode="nearest-exact")
    view = ViewAugment(ViewConfig(size=20))
    box = torch.tensor([[0.0, 0.0, 40.0, 80.0]])
    out = view.apply(shipped.clone(), torch.tensor([40]), torch.tensor([80]), _identity_params(1, 40, box=box))
    out = out * view.std + view.mean
    ref = TF.resized_crop(shipped[0], 0, 0, 40, 40, [20, 20], antialias=False)
    torch.testing.assert_close(out[0], ref, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------- end to end, both paths
def test_gpu_augment_views_match_cpu_views_in_distribution():
    """Same images through both paths: the fraction of gray views and the mean pixel agree."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = torch.as_tensor(rng.integers(0, 256, (400, 3, 32, 32)), dtype=torch.uint8)
    images = torch.nn.functional.avg_pool2d(images.float(), 3, 1, 1).round().to(torch.uint8)  # smoother
    cfg = preset("simclr", 32, strength=0.5, small_image=True, mean=(0, 0, 0), std=(1, 1, 1))[0]
    cpu = cpu_view_transform(cfg)
    cpu_views = torch.stack([cpu(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in images.repeat(2, 1, 1, 1)])
    gpu_views = GPUAugment([cfg])(images.repeat(2, 1, 1, 1))[0]

    def gray(v):
        return ((v[:, 0] - v[:, 1]).abs().amax((1, 2)) < 1e-2) & ((v[:, 1] - v[:, 2]).abs().amax((1, 2)) < 1e-2)

    assert abs(gray(cpu_views).float().mean() - 0.2) < 0.05
    assert abs(gray(gpu_views).float().mean() - 0.2) < 0.05
    assert abs(cpu_views.mean() - gpu_views.mean()) < 0.02
    assert gpu_views.shape == (800, 3, 32, 32) and gpu_views.dtype == torch.float32


def test_gpu_augment_makes_asymmetric_byol_views():
    cfgs = preset("byol", 32)
    images = torch.randint(0, 256, (64, 3, 48, 48), dtype=torch.uint8)
    sizes = torch.tensor([[96, 48]] * 64)
    v1, v2_ = GPUAugment(cfgs)(images, sizes)
    assert v1.shape == v2_.shape == (64, 3, 32, 32)
    assert not torch.allclose(v1, v2_)
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        GPUAugment(cfgs)(images[:, :1])


def test_on_device_rotation_and_shear_match_torchvision_affine():
    """Rotation and x-shear (the digits recipe) equal torchvision's ``affine`` with the same angle and
    shear, bilinear, inside the image; outside the rotated frame the view is 0 (RandomAffine's fill)."""
    torch.manual_seed(0)
    n, size = 3, 32
    x = torch.rand(n, 3, size, size)
    view = ViewAugment(ViewConfig(size=size, rotation=15.0, shear=10.0))
    angle, shear = torch.tensor([12.0, -7.5, 3.0]), torch.tensor([-9.0, 4.0, 0.0])
    out = _raw(view, x, _identity_params(n, size, angle=angle, shear=shear))
    mid = slice(8, 24)  # pixels whose source lies well inside the image
    for i in range(n):
        ref = TF.affine(
            x[i],
            angle=float(angle[i]),
            translate=[0, 0],
            scale=1.0,
            shear=[float(shear[i]), 0.0],
            interpolation=TF.InterpolationMode.BILINEAR,
        )
        torch.testing.assert_close(out[i][:, mid, mid], ref[:, mid, mid], atol=1e-5, rtol=0)
    corners = out[:2, :, [0, 0, -1, -1], [0, -1, 0, -1]]  # rotated by 12 and -7.5 degrees: corners fall outside
    assert torch.allclose(corners, torch.zeros_like(corners), atol=1e-6)


def test_digits_recipe_rotation_and_shear_distribution():
    """The on-device path draws rotation and shear uniformly in the recipe's ranges."""
    view = ViewAugment(ViewConfig(size=32, rotation=15.0, shear=10.0))
    sizes = torch.full((20000,), 32)
    params = view.sample_params(sizes, sizes, torch.Generator().manual_seed(0))
    for key, bound in (("angle", 15.0), ("shear", 10.0)):
        values = params[key]
        assert values.min() >= -bound and values.max() <= bound
        assert abs(values.mean()) < 0.05 * bound and abs(values.std() - bound / 3**0.5) < 0.03 * bound
