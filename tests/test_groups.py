import pytest
import torch
import torch.nn as nn

from mrpf import groups
from mrpf.config import DeviceParams
from mrpf.devices import setup
from mrpf.io import save_checkpoint
from mrpf.models import arch_description, build_model, load_model

CPU = setup(DeviceParams(name="cpu", channels_last=False, bf16=False))


def test_a_residual_stream_is_one_group():
    model = build_model("resnet18_w8", 10, 32)
    _, found = groups.find_groups(model, 32, 10)
    stem = [g for g in found if g.root == "net.conv1" or "net.conv1" in g.members]
    assert len(stem) == 1
    members = set(stem[0].members)
    # the stem and every block output of stage 1 are added together: one coupled group
    assert {"net.conv1", "net.layer1.0.conv2", "net.layer1.1.conv2"} <= members
    # stage 2's residual stream (its 1x1 shortcut and both block outputs) is another single group
    stage2 = [g for g in found if "net.layer2.0.shortcut.0" in g.members]
    assert len(stage2) == 1 and {"net.layer2.0.conv2", "net.layer2.1.conv2"} <= set(stage2[0].members)
    # the classifier's outputs are never a group
    assert not any("net.fc" in g.members for g in found)


def test_vgg_has_one_group_per_conv():
    model = build_model("vgg11_w8", 10, 32)
    _, found = groups.find_groups(model, 32, 10)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert sorted(g.root for g in found) == sorted(convs)


def test_mask_zeroes_the_channels_and_restores_exactly():
    torch.manual_seed(0)
    model = build_model("vgg11_w8", 10, 32).eval()
    _, found = groups.find_groups(model, 32, 10)
    group = found[2]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(2, 3, 32, 32)
    captured = {}
    conv = dict(model.named_modules())[group.root]
    idx = dict(model.named_modules())["net.features"]
    handle = idx[idx_of(idx, conv) + 1].register_forward_hook(lambda m, i, o: captured.update(out=o))
    with groups.masked(model, group, torch.tensor([0, 3])):
        model(x)
        assert captured["out"][:, [0, 3]].abs().max() == 0       # masked channels output exactly 0 after BN
        assert captured["out"][:, 1].abs().max() > 0
    handle.remove()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def idx_of(seq, module):
    return [i for i, m in enumerate(seq) if m is module][0]


@pytest.mark.parametrize("name, size", [("vgg16_w8", 32), ("resnet18_w8", 32), ("mobilevit_xxs", 32),
                                        ("tv:mobilenet_v2", 32)])
def test_forward_works_after_pruning_and_checkpoint_round_trip(tmp_path, name, size):
    torch.manual_seed(0)
    model = build_model(name, 10, size).eval()
    graph, found = groups.find_groups(model, size, 10)
    remove = {g.id: list(range(0, g.channels, 3))[: g.channels // 3] for g in found}
    history = groups.prune(graph, found, remove)
    dense_params = sum(p.numel() for p in build_model(name, 10, size).parameters())
    assert sum(p.numel() for p in model.parameters()) < dense_params
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 10)
    arch = arch_description(name, 10, size, (0.5,) * 3, (0.5,) * 3)
    arch["pruning_history"] = history
    save_checkpoint(tmp_path / "p.pt", arch, model.state_dict())
    loaded, _ = load_model(tmp_path / "p.pt", CPU)
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
