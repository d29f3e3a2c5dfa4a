"""build_backbone: torchvision names, any nn.Module, the small-image stem, local weights, errors."""

import pytest
import torch
import torchvision
from torch import nn

from lightning_ssl.backbones import build_backbone, reset_parameters


@pytest.mark.parametrize(
    "name, dim", [("resnet18", 512), ("resnet50", 2048), ("mobilenet_v3_small", 576), ("efficientnet_b0", 1280)]
)
def test_torchvision_names_strip_the_classifier(name, dim):
    module, feature_dim = build_backbone(name)
    assert feature_dim == dim
    module.eval()
    assert module(torch.randn(2, 3, 64, 64)).shape == (2, dim)


def test_small_image_stem_keeps_resolution():
    module, dim = build_backbone("resnet18", small_image=True)
    resnet = module.module
    assert (
        resnet.conv1.kernel_size == (3, 3) and resnet.conv1.stride == (1, 1) and isinstance(resnet.maxpool, nn.Identity)
    )
    feats = {}

    def record(module, inputs, output):
        feats["layer1"] = output.shape

    resnet.layer1.register_forward_hook(record)
    module(torch.randn(2, 3, 32, 32))
    assert feats["layer1"][-2:] == (32, 32)  # the ImageNet stem would give 8 x 8


def test_any_module_with_inferred_dimension(tiny_backbone):
    module, dim = build_backbone(tiny_backbone, small_image=False)
    assert dim == 16
    assert module(torch.randn(3, 3, 32, 32)).shape == (3, 16)


def test_small_image_on_non_resnet_is_a_clear_error():
    with pytest.raises(ValueError, match="conv1"):
        build_backbone("mobilenet_v3_small", small_image=True)


def test_unknown_name_and_wrong_type():
    with pytest.raises(ValueError, match="Unknown backbone 'resnet_18'"):
        build_backbone("resnet_18")
    with pytest.raises(TypeError, match="nn.Module"):
        build_backbone(42)


def test_weights_from_a_local_file(tmp_path):
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), tmp_path / "r18.pt")
    module, _ = build_backbone("resnet18", weights_path=tmp_path / "r18.pt")
    torch.testing.assert_close(module.module.conv1.weight, reference.conv1.weight)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(RuntimeError):
        build_backbone("resnet18", weights_path=tmp_path / "bad.pt")


def test_reset_parameters_gives_a_new_independent_copy(tiny_backbone):
    fresh = reset_parameters(tiny_backbone, seed=3)
    again = reset_parameters(tiny_backbone, seed=3)
    first_conv = lambda m: m.net[0].weight  # noqa: E731
    assert not torch.equal(first_conv(fresh), first_conv(tiny_backbone))
    torch.testing.assert_close(first_conv(fresh), first_conv(again))
