"""Latency as a budget metric (``prune.metric: latency``): a lookup table of each layer's time.

After NetAdapt (Yang et al., ECCV 2018) and HALP (Shen et al., NeurIPS 2022): every leaf
module of the dense model (convolution, linear, normalisation, activation, pooling) is timed
alone on the target device at a grid of its input and output widths (``WIDTH_FRACTIONS`` of
its dense widths, at the activation size it sees in the network); a model's predicted time is
the sum over its leaf modules of the table, interpolated bilinearly at their current widths,
times the dense model's measured time over that sum for the dense model (residual
additions, functional ops and framework overhead taken to shrink with the layers; a
slower or faster machine moves the whole table alike). The budget search meets ``prune.sparsity`` on this
prediction the way it meets MACs on Torch-Pruning's counter. The table alone misses what a
model of uneven widths costs as a whole (odd channel counts run slower than their
interpolation), so each pruning step then measures its candidate against the dense model, back
to back, and corrects the target on the prediction until the measured time meets the budget
(``calibrate``, NetAdapt's measure-the-proposal step). ``mrpf prune`` reports the prediction
and the pruned model's measured time side by side.

Hand-written: Torch-Pruning and timm count MACs and parameters, not time, and no maintained
library builds per-layer latency tables for PyTorch modules on the CPU.
"""

from __future__ import annotations

import bisect
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn as nn

from .errors import MrpfError
from .io import write_json
from .timing import latency_ms, timed_ms

WIDTH_FRACTIONS = (0.1, 0.325, 0.55, 0.775, 1.0)   # of a layer's dense widths, timed for the table
TABLE_REPEATS = 5                                  # timed forward passes per table entry (the fastest counts)
TABLE_FILE = "latency_table.json"                  # cached in the prune (or mrs) run's folder
CALIBRATION_ROUNDS = 4        # candidates measured per pruning step (the first planned on the table alone)
CALIBRATION_TOLERANCE = 0.03  # a candidate within this fraction of the target time ends the search
MEASURE_ROUNDS = 3            # interleaved dense / candidate timings per measurement (fastest of each)




def _channel_dim(shape: tuple) -> int:
    """Where a leaf module's channels are: dim 1 of an image tensor (N, C, H, W), else the last."""
    return 1 if len(shape) == 4 else len(shape) - 1


def _leaf_calls(model: nn.Module, input_size: int, batch: int = 1) -> dict[str, tuple[tuple, tuple]]:
    """Input and output shape of each call of a leaf module, at ``batch``: keyed by module name,
    ``NAME#k`` for its k-th call after the first (torchvision's ResNet blocks call one ReLU twice)."""
    calls: dict[str, tuple[tuple, tuple]] = {}

    def record(name, inputs, output):
        if inputs and isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor):
            key, k = name, 1
            while key in calls:
                key, k = f"{name}#{k}", k + 1
            calls[key] = (tuple(inputs[0].shape), tuple(output.shape))

    hooks = [module.register_forward_hook(lambda m, i, o, name=name: record(name, i, o))
             for name, module in model.named_modules() if name and not list(module.children())]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(batch, 3, input_size, input_size, device=device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return calls


def _resized(module: nn.Module, c_in: int, c_out: int) -> nn.Module | None:
    """A fresh module of ``module``'s kind with ``c_in`` input and ``c_out`` output channels, or
    None for a layer whose widths are not modelled (grouped convolutions, layers with buffers
    or parameters of other kinds, such as the input normalisation): timed at its dense widths
    and counted as a constant."""
    if isinstance(module, nn.Conv2d):
        depthwise = module.groups > 1 and module.groups == module.in_channels
        if module.groups > 1 and not depthwise:
            return None
        return nn.Conv2d(c_in, c_in if depthwise else c_out, module.kernel_size, module.stride, module.padding,
                         module.dilation, groups=c_in if depthwise else 1, bias=module.bias is not None,
                         padding_mode=module.padding_mode)
    if isinstance(module, nn.Linear):
        return nn.Linear(c_in, c_out, bias=module.bias is not None)
    if isinstance(module, nn.BatchNorm2d):
        return nn.BatchNorm2d(c_in)
    if isinstance(module, nn.LayerNorm):
        return nn.LayerNorm(c_in, eps=module.eps, elementwise_affine=module.elementwise_affine)
    if not any(True for _ in module.parameters()) and not any(True for _ in module.buffers()):
        return copy.deepcopy(module)          # activations, pooling, dropout, flatten: width-agnostic
    return None


def _widths(dense: int) -> list[int]:
    return sorted({max(1, round(f * dense)) for f in WIDTH_FRACTIONS})


def _interpolate(axis: list[int], x: float) -> tuple[int, int, float]:
    """Indices of the grid points around ``x`` on ``axis`` and the weight of the upper one
    (beyond the grid: the nearest segment, extrapolated)."""
    if len(axis) == 1:
        return 0, 0, 0.0
    k = min(max(bisect.bisect_left(axis, x), 1), len(axis) - 1)
    return k - 1, k, (x - axis[k - 1]) / (axis[k] - axis[k - 1])


class LatencyTable:
    """Per-leaf-module forward times (ms at ``batch``) over a grid of widths, and the dense
    model's measured time over their sum (``scale``)."""

    def __init__(self, entries: dict[str, dict], scale: float, batch: int, device: str, threads: int):
        self.entries, self.scale, self.batch, self.device, self.threads = entries, scale, batch, device, threads

    @classmethod
    def measure(cls, model: nn.Module, input_size: int, runtime, batch: int, log=print) -> LatencyTable:
        """Time each leaf module of ``model`` alone at every width pair of the grid (fp32, eval mode,
        ``runtime``'s device and memory format; the fastest of TABLE_REPEATS passes) and the whole
        model before and after them (the fastest of both), for the scale."""

        started = time.perf_counter()
        was_training = model.training
        model.eval()
        whole = [latency_ms(model, input_size, runtime, batch, TABLE_REPEATS, reduce=min)]
        entries = {}
        for key, (in_shape, out_shape) in _leaf_calls(model, input_size, batch).items():
            module = model.get_submodule(key.split("#")[0])
            c_in, c_out = in_shape[_channel_dim(in_shape)], out_shape[_channel_dim(out_shape)]
            if _resized(module, c_in, c_out) is None:      # timed as it is, a constant
                ins, outs = [c_in], None
            else:
                ins, outs = _widths(c_in), (_widths(c_out) if _two_widths(module) else None)
            grid = []
            for a in ins:
                row = []
                for b in (outs or [a]):
                    probe = runtime.prepare(_resized(module, a, b) or copy.deepcopy(module)).eval()
                    shape = list(in_shape)
                    shape[_channel_dim(in_shape)] = a
                    x = torch.rand(shape, device=runtime.device)
                    if x.dim() == 4:
                        x = x.contiguous(memory_format=runtime.memory_format)
                    row.append(timed_ms(lambda: probe(x), runtime.device, TABLE_REPEATS, reduce=min))
                grid.append(row)
            entries[key] = {"ins": ins, "outs": outs, "ms": grid}
        table = cls(entries, 1.0, batch, str(runtime.device), torch.get_num_threads())
        whole = min(whole + [latency_ms(model, input_size, runtime, batch, TABLE_REPEATS, reduce=min)])
        model.train(was_training)
        layers = table.layers_ms(model, input_size)
        table.scale = whole / layers
        log(f"latency table: {len(entries)} layers timed at batch {batch} in {time.perf_counter() - started:.1f}s; "
            f"dense model {whole:.2f} ms, its layers alone {layers:.2f} ms")
        return table

    def layers_ms(self, model: nn.Module, input_size: int) -> float:
        """Sum over ``model``'s leaf modules of the table at their widths."""
        total = 0.0
        for key, (in_shape, out_shape) in _leaf_calls(model, input_size).items():
            entry = self.entries.get(key)
            if entry is None:
                raise MrpfError(f"latency table: no entry for layer {key!r} (a table of another architecture?)")
            i0, i1, wi = _interpolate(entry["ins"], in_shape[_channel_dim(in_shape)])
            grid = entry["ms"]
            if entry["outs"] is None:
                total += (1 - wi) * grid[i0][0] + wi * grid[i1][0]
                continue
            o0, o1, wo = _interpolate(entry["outs"], out_shape[_channel_dim(out_shape)])
            total += ((1 - wi) * ((1 - wo) * grid[i0][o0] + wo * grid[i0][o1])
                      + wi * ((1 - wo) * grid[i1][o0] + wo * grid[i1][o1]))
        return total

    def predict(self, model: nn.Module, input_size: int) -> float:
        """Predicted forward time (ms at the table's batch) of ``model``."""
        return self.scale * self.layers_ms(model, input_size)

    def key(self) -> dict:
        return {"batch": self.batch, "device": self.device, "threads": self.threads}

    def save(self, path: Path) -> None:
        write_json(path, {**self.key(), "scale": self.scale, "width_fractions": list(WIDTH_FRACTIONS),
                          "entries": self.entries})

    @classmethod
    def load(cls, path: Path) -> LatencyTable | None:
        """The table saved at ``path``; None for a file of another format (measured again)."""
        raw = json.loads(Path(path).read_text())
        if not {"entries", "scale", "batch", "device", "threads"} <= set(raw):
            return None
        return cls(raw["entries"], raw["scale"], raw["batch"], raw["device"], raw["threads"])


def _two_widths(module: nn.Module) -> bool:
    """Whether a layer's input and output widths can differ (convolution and linear layers)."""
    return isinstance(module, (nn.Conv2d, nn.Linear)) and not (
        isinstance(module, nn.Conv2d) and module.groups > 1)


def table_for(model: nn.Module, input_size: int, runtime, batch: int, folder: Path, log=print) -> LatencyTable:
    """The latency table of ``model`` on ``runtime``: read from ``folder``/TABLE_FILE when it was
    measured there for the same device, batch, threads and layers, else measured and saved there."""
    path = Path(folder) / TABLE_FILE
    wanted = {"batch": batch, "device": str(runtime.device), "threads": torch.get_num_threads()}
    if path.is_file():
        table = LatencyTable.load(path)
        if table is not None and table.key() == wanted and set(table.entries) == set(_leaf_calls(model, input_size)):
            log(f"latency table from {path}")
            return table
    table = LatencyTable.measure(model, input_size, runtime, batch, log)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.save(path)
    return table


def table_if_budgeted(params, model: nn.Module, input_size: int, runtime, folder: Path,
                      log=print) -> LatencyTable | None:
    """The run's latency table (``table_for`` at ``evaluate.latency_batch``) where ``prune.metric``
    is latency, else None."""
    if params.prune.metric != "latency":
        return None
    return table_for(model, input_size, runtime, params.evaluate.latency_batch, folder, log)


def budget_counts(model: nn.Module, input_size: int, table: LatencyTable | None = None) -> dict:
    """The budget metrics of ``model``: MACs and parameters (Torch-Pruning's counter) and, with a
    latency table, its predicted time (``latency``, ms)."""
    from .models import count_ops

    counts = count_ops(model, input_size)
    if table is not None:
        counts["latency"] = table.predict(model, input_size)
    return counts


class MeasuredLatency:
    """A model's forward time as a fraction of the dense model's, both timed back to back in
    interleaved rounds (the fastest of each), so a machine's drift cancels in the ratio."""

    def __init__(self, dense_model: nn.Module, input_size: int, runtime, batch: int, repeats: int):
        self.dense, self.input_size, self.runtime = dense_model.eval(), input_size, runtime
        self.batch, self.repeats = batch, repeats

    def fraction(self, model: nn.Module) -> float:

        was_training = model.training
        model.eval()
        dense, candidate = [], []
        for _ in range(MEASURE_ROUNDS):
            for model_, times in ((self.dense, dense), (model, candidate)):
                times.append(latency_ms(model_, self.input_size, self.runtime, self.batch, self.repeats, reduce=min))
        model.train(was_training)
        return min(candidate) / min(dense)


def calibrate(plan, budget: float, model: nn.Module, input_size: int, dense_predicted: float,
              table: LatencyTable, meter: MeasuredLatency, log=print) -> tuple[list[float], object, list[dict]]:
    """Meet a latency ``budget`` on the measured time (NetAdapt, Yang et al., ECCV 2018: measure
    each proposal). ``plan(target) -> (ratios, apply)`` plans a pruning of ``model`` to a
    reduction ``target`` of the table's prediction (``apply(m)`` prunes ``m`` in place). Each
    round prunes a copy, measures it against the dense model and rescales the target by the
    measured over the predicted time: t' = 1 - (1 - budget)(1 - predicted)/(1 - measured).
    Returns the ratios and ``apply`` of the candidate measured closest to the budget, and
    every round's target, predicted and measured reduction."""
    target, trace, best = budget, [], None
    for round_ in range(CALIBRATION_ROUNDS):
        try:
            ratios, apply = plan(target)
        except MrpfError as error:
            if best is None:
                raise
            log(f"latency calibration stops at round {round_ + 1}: {error}")
            break
        candidate = copy.deepcopy(model)
        apply(candidate)
        predicted = 1 - table.predict(candidate, input_size) / dense_predicted
        measured = 1 - meter.fraction(candidate)
        trace.append({"target": target, "predicted": predicted, "measured": measured})
        log(f"latency calibration {round_ + 1}: target {target:.1%} on the table, predicted {predicted:.1%}, "
            f"measured {measured:.1%} (budget {budget:.1%})")
        if best is None or abs(measured - budget) < abs(best[2] - budget):
            best = (ratios, apply, measured)
        if abs(measured - budget) <= CALIBRATION_TOLERANCE * (1 - budget) or measured >= 1:
            break
        target = 1 - (1 - budget) * (1 - predicted) / (1 - measured)
        if not 0 < target < 1:
            log(f"latency calibration stops: the corrected target {target:.1%} lies outside (0, 1)")
            break
    return best[0], best[1], trace
