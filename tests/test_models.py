import pytest
import torch

from mrpf.errors import MrpfError
from mrpf.models import build_model, count_parameters


@pytest.mark.parametrize("name", ["resnet18", "vgg16", "vgg11_w8", "resnet18_w8", "mobilevit_xxs", "mobilevit_xs",
                                  "mobilevit_s", "tv:resnet18", "timm:resnet10t"])
@pytest.mark.parametrize("size, classes", [(32, 10), (64, 200)])
def test_every_registry_model_runs_at_32_and_64_with_any_class_count(name, size, classes):
    model = build_model(name, classes, size).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, size, size))
    assert out.shape == (2, classes)


def test_cpu_scale_vgg_has_about_150k_parameters():
    assert 140_000 <= count_parameters(build_model("vgg11_w8", 10, 32)) <= 155_000


def test_cifar_resnet18_has_a_3x3_stem_and_no_maxpool():
    net = build_model("resnet18", 10, 32).net
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in net.modules())


def test_normalisation_lives_inside_the_model():
    model = build_model("vgg11_w8", 10, 32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    x = torch.rand(1, 3, 32, 32)
    expected = (x - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / 0.2
    assert torch.allclose(model.normalize(x), expected)


@pytest.mark.parametrize("name", ["resnet99", "vgg11_w0", "tv:not_a_model", "timm:not_a_model"])
def test_unknown_architecture_is_a_clear_error(name):
    with pytest.raises(MrpfError, match="model.arch"):
        build_model(name, 10, 32)
