"""prune.metric: latency — the per-layer latency table (mrpf/latency.py) and the budget search on it."""

import statistics

import pytest
import torch
import torch.nn as nn

from mrpf import allocation, groups, latency
from mrpf.config import DeviceParams
from mrpf.devices import setup
from mrpf.errors import MrpfError
from mrpf.models import build_model

from .conftest import OVERHEAD_MS

BATCH = 4


class Shift(nn.Module):
    """A layer with a buffer (like the input normalisation): timed once, a constant."""

    def __init__(self):
        super().__init__()
        self.register_buffer("offset", torch.full((1, 3, 1, 1), 0.5))

    def forward(self, x):
        return x - self.offset


class TwoConv(nn.Module):
    """One ReLU module called twice at different widths, as in torchvision's ResNet blocks."""

    def __init__(self, a: int, b: int):
        super().__init__()
        self.shift, self.relu = Shift(), nn.ReLU()
        self.conv1, self.bn1 = nn.Conv2d(3, a, 3, padding=1), nn.BatchNorm2d(a)
        self.conv2, self.bn2 = nn.Conv2d(a, b, 3, stride=2, padding=1), nn.BatchNorm2d(b)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(b, 10)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(self.shift(x))))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def output_elements(model: nn.Module, size: int) -> float:
    """What the stand-in clock says each leaf call of ``model`` costs, summed, at BATCH."""
    return sum(float(torch.Size(out).numel()) for _, out in latency._leaf_calls(model, size, BATCH).values())


def test_the_table_interpolates_every_layer_call_at_the_pruned_widths(fake_clock):
    runtime = setup(DeviceParams(name="cpu", channels_last=False))
    dense = TwoConv(40, 60).eval()
    table = latency.LatencyTable.measure(dense, 16, runtime, BATCH, log=lambda m: None)
    assert {"relu", "relu#1", "shift", "conv1", "fc"} <= set(table.entries)
    assert table.entries["shift"]["ins"] == [3]                    # a layer with a buffer: one width
    assert table.entries["conv2"]["outs"] == [6, 20, 33, 46, 60]   # WIDTH_FRACTIONS of 60
    # the scale: the whole model's time over its layers' at the dense widths
    layers = output_elements(dense, 16)
    assert table.scale == pytest.approx((OVERHEAD_MS + layers) / layers)
    assert table.predict(dense, 16) == pytest.approx(OVERHEAD_MS + layers)
    for a, b in [(27, 13), (4, 59), (40, 7), (1, 1)]:   # between grid points and below the smallest
        pruned = TwoConv(a, b).eval()
        assert table.predict(pruned, 16) == pytest.approx(table.scale * output_elements(pruned, 16), rel=1e-9)


def test_a_latency_budget_is_met_on_the_tables_prediction(fake_clock):
    runtime = setup(DeviceParams(name="cpu", channels_last=False))
    model = build_model("vgg11_w8", 10, 32).eval()
    table = latency.LatencyTable.measure(model, 32, runtime, BATCH, log=lambda m: None)
    _, found = groups.find_groups(model, 32, 10)
    with pytest.raises(MrpfError, match="latency table"):
        allocation.solve(model, found, [1.0] * len(found), input_size=32, num_classes=10, budget=0.5,
                         metric="latency")
    dense = latency.budget_counts(model, 32, table)
    mrs = [1.0 + g for g in range(len(found))]
    solved = allocation.solve(model, found, mrs, input_size=32, num_classes=10, budget=0.6, metric="latency",
                              table=table)
    pruned, _ = allocation.prune_copy(model, 32, 10, solved["ratios"], caps=solved["caps"])
    predicted = table.predict(pruned, 32)
    assert solved["counts"]["latency"] == pytest.approx(predicted)
    # at least the budget; above it by at most a step of the narrow first layer (8 channels here)
    assert 0.6 <= 1 - predicted / dense["latency"] <= 0.6 + 0.05
    # the same budget in MACs is another model: time does not shrink with MACs alone
    by_macs = allocation.solve(model, found, mrs, input_size=32, num_classes=10, budget=0.6, metric="macs",
                               table=table)
    assert 1 - by_macs["counts"]["latency"] / dense["latency"] < 0.6 - 0.05


def test_the_table_is_cached_in_the_run_folder_and_remeasured_for_another_batch(tmp_path, fake_clock):
    runtime = setup(DeviceParams(name="cpu", channels_last=False))
    model = TwoConv(8, 16).eval()
    logs = []
    first = latency.table_for(model, 16, runtime, BATCH, tmp_path, logs.append)
    again = latency.table_for(model, 16, runtime, BATCH, tmp_path, logs.append)
    assert (tmp_path / latency.TABLE_FILE).is_file() and again.entries == first.entries
    assert sum("latency table from" in line for line in logs) == 1
    other = latency.table_for(model, 16, runtime, 2 * BATCH, tmp_path, logs.append)
    assert other.batch == 2 * BATCH and sum("latency table from" in line for line in logs) == 1
    (tmp_path / latency.TABLE_FILE).write_text('{"entries": {}, "rest_ms": 1.0}')   # a file of another format
    assert latency.table_for(model, 16, runtime, BATCH, tmp_path, logs.append).entries == first.entries
    assert sum("latency table from" in line for line in logs) == 1


def test_the_table_counts_the_fastest_pass_of_each_timing(monkeypatch, fake_clock):
    """Other work on a shared machine only ever slows a pass down: the table keeps each layer's
    and the whole model's fastest pass, so slow passes move neither the layers nor the scale."""
    from mrpf import timing

    def slowed(clock):
        def timed(forward, device, repeats, warmup=3, reduce=None):
            t = clock(forward, device, repeats, warmup)
            return (reduce or statistics.median)([t, 3 * t, 3 * t, 5 * t, t])
        return timed

    monkeypatch.setattr(latency, "timed_ms", slowed(latency.timed_ms))
    monkeypatch.setattr(timing, "timed_ms", slowed(timing.timed_ms))
    runtime = setup(DeviceParams(name="cpu", channels_last=False))
    dense = TwoConv(40, 60).eval()
    table = latency.LatencyTable.measure(dense, 16, runtime, BATCH, log=lambda m: None)
    layers = output_elements(dense, 16)
    assert table.scale == pytest.approx((OVERHEAD_MS + layers) / layers)
    pruned = TwoConv(27, 13).eval()
    assert table.predict(pruned, 16) == pytest.approx(table.scale * output_elements(pruned, 16), rel=1e-9)
