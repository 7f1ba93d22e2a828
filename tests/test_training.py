import json
import os

import pytest
import torch

from mrpf.config import DeviceParams, load_params
from mrpf.devices import setup
from mrpf.errors import MrpfError
from mrpf.io import load_checkpoint, save_checkpoint
from mrpf.models import arch_description, build_model, load_model
from mrpf.training import make_scheduler, train

from .conftest import mrpf_cli as mrpf
from .conftest import tiny_overrides

CPU = setup(DeviceParams(name="cpu", channels_last=True, bf16=False))


def quiet(message):
    pass


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    arch = arch_description("resnet18_w8", 10, 32, (0.4, 0.4, 0.4), (0.2, 0.2, 0.2))
    torch.manual_seed(0)
    model = build_model(**arch).eval()
    save_checkpoint(tmp_path / "c.pt", arch, model.state_dict())
    loaded, state = load_model(tmp_path / "c.pt", CPU)
    model = CPU.prepare(model)     # same memory format: channels_last picks other conv kernels
    x = torch.rand(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert state["arch"] == arch


def test_outputs_get_ordinary_file_permissions(tmp_path):
    from mrpf.io import write_json

    write_json(tmp_path / "m.json", {"a": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o666 & ~mask


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    arch = arch_description("vgg11_w8", 10, 32, (0.5,) * 3, (0.5,) * 3)
    weights = build_model("resnet18_w8", 10, 32).state_dict()
    save_checkpoint(tmp_path / "c.pt", arch, weights)
    with pytest.raises(MrpfError, match="weights do not fit architecture 'vgg11_w8'"):
        load_model(tmp_path / "c.pt", CPU)


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    arch = arch_description("vgg11_w8", 10, 32, (0.5,) * 3, (0.5,) * 3)
    save_checkpoint(tmp_path / "c.pt", arch, build_model(**arch).state_dict())
    data = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "t.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(MrpfError, match="unreadable or truncated"):
        load_checkpoint(tmp_path / "t.pt")


class _Boom:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"format": "mrpf-checkpoint/1", "arch": {}, "state_dict": {}, "payload": _Boom()}, tmp_path / "evil.pt")
    with pytest.raises(MrpfError, match="refused"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "multistep", "constant"])
def test_schedules_stay_positive_and_peak_at_lr(schedule):
    params = load_params(None, [f"train.schedule={schedule}", "train.epochs=4"])
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = make_scheduler(opt, params.train, steps_per_epoch=10)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert min(lrs) > 0 and max(lrs) == pytest.approx(0.1)
    if schedule == "multistep":
        assert lrs[0] == pytest.approx(0.1) and lrs[-1] == pytest.approx(0.001)


@pytest.mark.parametrize("method", ["pgd_at", "trades", "mart"])
def test_each_method_trains_and_writes_its_outputs(tiny_data, tmp_path, method):
    params = load_params(None, tiny_overrides(tiny_data) + [f"train.method={method}", "train.epochs=1"])
    summary = train(params, tmp_path / "run", log=quiet)
    assert summary["method"] == method
    assert summary["val_pgd_acc"] <= summary["val_clean_acc"]
    assert round(summary["val_pgd_acc"] * 100, 9) == int(round(summary["val_pgd_acc"] * 100))   # 100 val images
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    assert not (tmp_path / "run" / "last.pt").exists()
    lines = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,train_loss") and len(lines) == 2


@pytest.mark.parametrize("ema", ["null", "0.9"])
def test_resumed_run_ends_with_the_same_weights(tiny_data, tmp_path, ema):
    params = load_params(None, tiny_overrides(tiny_data) + ["train.epochs=3", f"train.ema_decay={ema}"])
    train(params, tmp_path / "straight", log=quiet)

    def stop_after_epoch_2(message):
        if message.startswith("epoch 2/3"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(params, tmp_path / "resumed", log=stop_after_epoch_2)
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 1
    messages = []
    train(params, tmp_path / "resumed", log=messages.append)
    assert messages[0].startswith("resuming resumed after epoch 2/3")
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "straight" / "history.csv").read_text().count("\n") == \
        (tmp_path / "resumed" / "history.csv").read_text().count("\n") == 4


def test_resume_with_other_params_is_refused(tiny_data, tmp_path):
    params = load_params(None, tiny_overrides(tiny_data) + ["train.epochs=2"])

    def stop(message):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(params, tmp_path / "run", log=stop)
    params = params.replace("train", lr=0.01)
    with pytest.raises(MrpfError, match="different parameters"):
        train(params, tmp_path / "run", log=quiet)


def test_ema_checkpoint_holds_the_average_not_the_last_weights(tiny_data, tmp_path):
    plain = load_params(None, tiny_overrides(tiny_data) + ["train.epochs=1"])
    averaged = load_params(None, tiny_overrides(tiny_data) + ["train.epochs=1", "train.ema_decay=0.5"])
    train(plain, tmp_path / "plain", log=quiet)
    train(averaged, tmp_path / "ema", log=quiet)
    a = load_checkpoint(tmp_path / "plain" / "checkpoint.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "ema" / "checkpoint.pt")["state_dict"]
    assert a.keys() == b.keys()                       # a plain model's state dict, loadable as usual
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


def test_divergence_stops_with_epoch_and_batch_and_no_checkpoint(tiny_data, tmp_path):
    params = load_params(None, tiny_overrides(tiny_data) + ["train.lr=1e30", "train.method=clean"])
    with pytest.raises(MrpfError, match=r"training diverged: loss is (nan|inf) at epoch 1, batch \d+"):
        train(params, tmp_path / "run", log=quiet)
    assert not (tmp_path / "run" / "checkpoint.pt").exists() and not (tmp_path / "run" / "last.pt").exists()


def test_cli_train_then_evaluate(tiny_data, tmp_path):
    overrides = tiny_overrides(tiny_data) + ["train.epochs=1", "evaluate.autoattack_images=8",
                                              "evaluate.batch_size=50"]
    done = mrpf("train", "--run", "r1", *overrides, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "epoch 1/1" in done.stderr
    done = mrpf("evaluate", "--run", "r1", *overrides, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "runs" / "r1" / "eval.json").read_text())
    for key in ("clean_acc", "fgsm_acc", "pgd_acc", "cw_acc", "autoattack_acc", "params", "macs", "latency_ms"):
        assert key in metrics
    assert metrics["n_images"] == 100 and metrics["autoattack_images"] == 8
    assert metrics["pgd_acc"] <= metrics["clean_acc"]
    assert 0 < metrics["macs"] and 140_000 < metrics["params"] < 155_000
    outcomes = __import__("numpy").load(tmp_path / "runs" / "r1" / "eval_per_image.npz")
    assert outcomes["pgd"].shape == (100,) and outcomes["autoattack"].shape == (8,)
    assert outcomes["pgd"].mean() == pytest.approx(metrics["pgd_acc"])


def test_gradient_step_on_the_cpu_is_objective_then_backward():
    """device.cuda_graphs applies to CUDA only: on the CPU each call is the plain eager step
    (the graph path is tested against the eager one in tests/test_cuda.py)."""
    from mrpf.gradient_step import GradientStep
    from mrpf.objectives import OBJECTIVES, Adversary

    torch.manual_seed(0)
    model = CPU.prepare(build_model("vgg11_w8", 10, 32)).train()
    x = torch.rand(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.arange(8) % 10
    adversary = Adversary(eps=8 / 255, step_size=2 / 255, steps=2)
    step = GradientStep(model, OBJECTIVES["pgd_at"], adversary, 6.0, CPU, log=quiet, warmup=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}     # BN statistics move in train mode
    torch.manual_seed(1)
    loss, _ = step(x, y)
    grads = [p.grad.clone() for p in model.parameters()]
    model.load_state_dict(before)
    torch.manual_seed(1)
    model.zero_grad(set_to_none=True)
    reference, _ = OBJECTIVES["pgd_at"](model, x, y, adversary, 6.0)
    reference.backward()
    assert step.graph is None and torch.equal(loss, reference.detach())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))


@pytest.mark.parametrize("args, message", [
    (["train", "--run", "x", "train.epochs=-1"], "train.epochs: expected a non-negative integer"),
    (["train", "--run", "x", "model.arch=resnet99"], "model.arch: unknown architecture 'resnet99'"),
    (["train", "--run", "x", "--device", "cuda:7"], "device.name"),
    (["train", "--run", "x", "device.cuda_graphs=maybe"], "device.cuda_graphs: expected true or false"),
    (["train", "--run", "x", "data.calibration_size=1000"], "calibration_size=1000 is larger than the training split"),
    (["evaluate", "--run", "missing"], "no such file"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, tiny_data, args, message):
    done = mrpf(*args[:3], *tiny_overrides(tiny_data)[:4], *args[3:], cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and message in done.stderr
    assert not (tmp_path / "runs" / "x" / "checkpoint.pt").exists()


def test_l2_evaluation_derives_a_step_that_reaches_the_radius(tiny_data, trained_checkpoint, tmp_path):
    """Under attack.norm=l2 with evaluate.step_size null, PGD/CW step 2.5 * eps / steps, FGSM takes an
    L2 step, and the attacks are far stronger than PGD with the L-inf default step of 2/255."""
    from mrpf.evaluation import evaluate

    base = tiny_overrides(tiny_data) + ["attack.norm=l2", "attack.eps=2.0", "evaluate.attacks=[clean,fgsm,pgd,cw]"]
    metrics = evaluate(load_params(None, base), trained_checkpoint, tmp_path / "l2.json", log=quiet)
    assert metrics["norm"] == "l2" and metrics["step_size"] == pytest.approx(2.5 * 2.0 / 3)
    assert metrics["pgd_acc"] <= metrics["fgsm_acc"] <= metrics["clean_acc"]
    assert metrics["pgd_acc"] < metrics["clean_acc"] - 0.2
    # the old default: 3 steps of 2/255 cannot leave a ball of radius 2 (refused now), and is far weaker
    with pytest.raises(MrpfError, match="cannot reach the l2 radius"):
        load_params(None, base + ["evaluate.step_size=2/255"])
    from mrpf.attacks import pgd
    from mrpf.data import read_npz

    model, _ = load_model(trained_checkpoint, setup(load_params(None, base).device))
    test = read_npz(tiny_data["test"])
    x, y = test.x.float() / 255, test.y
    torch.manual_seed(0)
    x_short = pgd(model, x, y, eps=2.0, step_size=2 / 255, steps=3, norm="l2")
    with torch.no_grad():
        short = model(x_short).argmax(1) == y
    assert short.float().mean().item() > metrics["pgd_acc"] + 0.2


@pytest.mark.parametrize("overrides, step", [
    (["evaluate.pgd_steps=20"], 2.5 * (8 / 255) / 20),
    (["evaluate.pgd_steps=20", "evaluate.step_size=2/255"], 2 / 255),
    (["attack.norm=l2", "attack.eps=0.5", "evaluate.pgd_steps=20"], 0.0625),
])
def test_pgd_step_size_is_given_or_derived_from_eps_and_steps(overrides, step):
    from mrpf.config import pgd_step_size

    params = load_params(None, overrides)
    assert pgd_step_size(params.attack, params.evaluate.step_size, 20) == pytest.approx(step)
