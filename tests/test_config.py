import pytest

from mrpf.config import as_float, load_params, parse_override
from mrpf.errors import MrpfError


def test_defaults_validate_and_overrides_apply(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("train:\n  epochs: 7\nattack:\n  eps: 4/255\n")
    params = load_params(path, ["train.lr=0.05", "evaluate.attacks=[clean,pgd]"])
    assert params.train.epochs == 7
    assert params.train.lr == 0.05
    assert params.evaluate.attacks == ("clean", "pgd")
    assert params.attack.eps == pytest.approx(4 / 255)


def test_fraction_parsing():
    assert as_float("8/255", "k") == pytest.approx(8 / 255)
    assert as_float("0.5", "k") == 0.5
    with pytest.raises(MrpfError, match="k: expected a number"):
        as_float("__import__('os')", "k")


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", "unknown parameter 'train.epoch'"),
    ("trian.epochs=3", "unknown parameter 'trian'"),
    ("train.method=fgsm_at", "train.method: unknown value 'fgsm_at'"),
    ("train.epochs=-1", "train.epochs: expected a non-negative integer"),
    ("attack.eps=-0.1", "attack.eps: must be >= 0"),
    ("data.dataset=imagenet21k", "data.dataset: unknown dataset 'imagenet21k'"),
    ("train=3", "parameter 'train' must be a mapping"),
    ("noequals", "must look like section.key=value"),
    ("prune.search_finetune_batches=-1", "prune.search_finetune_batches: expected a non-negative integer"),
    ("prune.score_epochs=0", "prune.score_epochs: expected a positive integer"),
    ("prune.score_ratios=magnitude", "prune.score_ratios: unknown value 'magnitude'"),
    ("prune.score_lr=0", "prune.score_lr: must be > 0"),
    ("prune.allocation=inverse_mrs prune.search_finetune_batches=4",
     "prune.search_finetune_batches: fine-tunes joint_search's candidates, so it needs prune.allocation: joint_search"),
])
def test_bad_parameters_name_the_key(override, message):
    with pytest.raises(MrpfError, match=message):
        load_params(None, override.split())


def test_malformed_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: {epochs: 3\n")
    with pytest.raises(MrpfError, match="malformed YAML"):
        load_params(path)


def test_override_values_are_yaml():
    assert parse_override("a.b=[1, 2]") == {"a": {"b": [1, 2]}}
    assert parse_override("a.b=null") == {"a": {"b": None}}
