"""Learned channel selection (``prune.method: hydra | harp``): scores and keep-rates learned from
the robust loss with the weights frozen (docs/method.md, "Learned methods").

- HYDRA (Sehwag et al., "HYDRA: Pruning Adversarially Robust Neural Networks", NeurIPS 2020),
  structured: one score s_c per channel of every dependency group, initialised as HYDRA's
  scaled initialisation, s_c = sqrt(6 / fan_in) * m_c / max m (m_c: the channel's L1 magnitude,
  fan_in: the group root's inputs per channel). The masked model keeps the k_g top-scored
  channels of group g (k_g from the group's ratio: ``prune.score_ratios``) by multiplying every
  out-channel weight, bias and BN affine of the group with its mask (1 kept, 1e-3 dropped) (the MRS probe's masking,
  made differentiable); the mask's gradient passes straight through to the scores
  (dm/ds = 1, HYDRA's GetSubnet). The loss is the run's fine-tuning objective on adversarial
  examples made against the masked model; weights and BN statistics stay frozen (eval mode).
- HARP (Zhao & Wressnegger, "Holistic Adversarially Robust Pruning", ICLR 2023), structured:
  HYDRA's scores plus one keep-rate kappa_g in [1 - cap_g / C_g, 1] per group, starting at
  uniform_l1's. The hard mask keeps round(kappa_g C_g) top-scored channels; kappa_g gets the
  robust loss's gradient through a soft top-k surrogate sigmoid((kappa_g C_g - rank_c - 1/2) / tau_g)
  (straight through: the forward pass uses the hard mask) and the one-sided budget loss
  max(0, K(kappa) - K*) / K*, K(kappa) = sum_l M_l kappa_out(l) kappa_in(l) the kept cost under a
  bilinear model of each conv/linear layer's cost M_l (``layer_costs``) and K* the kept cost the
  step's budget allows. Each loss's rate gradient is scaled to norm 1 and the rates step by
  ``RATE_LR`` along their sum (the budget loss's gradient is orders of magnitude larger than
  the robust loss's, which a joint step would drown), projected back into their range. The two
  losses follow HARP's step-wise incremental schedule (``PHASES``): robustness alone, then the
  rate target alone, then both.

Why by hand: neither Torch-Pruning nor another maintained library learns channel masks from
an adversarial objective; HYDRA's and HARP's own code masks weights, not channel groups.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn

from . import allocation, stopping
from . import data as data_mod
from . import groups as groups_mod
from .config import Params
from .devices import Runtime
from .io import crash_point, load_checkpoint, save_checkpoint
from .objectives import objective_for, training_adversary
from .sensitivity import seeded_scope

SCORE_MOMENTUM = 0.9          # HYDRA's SGD momentum for the scores
SCORE_WEIGHT_DECAY = 1e-4     # HYDRA's weight decay on the scores
RATE_LR = 0.01               # HARP's keep-rate step per batch along each loss's unit-norm rate gradient
MASK_FLOOR = 1e-3            # a dropped channel's mask value (see MaskedModel.masks)
SOFT_TOPK_WIDTH = 0.05        # tau_g of HARP's soft top-k: this fraction of the group's width, >= 1 channel
PHASES = ((1.0, 0.0), (0.0, 1.0), (1.0, 1.0))   # (robust, budget) weights in each third of the batches
STATE_FILE = "scores.pt"      # a step's score-learning state, saved after each epoch (resume)


def layer_costs(model: nn.Module, found: list[groups_mod.Group], input_size: int,
                metric: str) -> list[tuple[float, int | None, int | None]]:
    """(M_l, group of l's output channels, group of its input channels) for each conv and linear
    layer: M_l its weights (``metric`` params) or weights x output positions (MACs; latency is
    modelled by MACs, as in ``allocation.group_costs``). None where no group prunes that side
    (the image input, the classifier output); a depthwise conv counts its one group once."""
    shapes = allocation.layer_output_shapes(model, input_size)
    out_of: dict[nn.Module, int] = {}
    in_of: dict[nn.Module, int] = {}
    for group in found:
        for dep, _ in group.tp_group:
            module = dep.target.module
            if module in shapes:
                side = out_of if group.tp_group._DG.is_out_channel_pruning_fn(dep.handler) else in_of
                side.setdefault(module, group.id)
    costs = []
    for module, shape in shapes.items():
        positions = math.prod(shape[2:]) if isinstance(module, nn.Conv2d) else (math.prod(shape[1:-1]) or 1)
        cost = float(module.weight.numel() * (1 if metric == "params" else positions))
        out_group, in_group = out_of.get(module), in_of.get(module)
        costs.append((cost, out_group, None if in_group == out_group else in_group))
    return costs


def kept_cost(costs: list[tuple[float, int | None, int | None]], kappa: torch.Tensor) -> torch.Tensor:
    """K(kappa) = sum_l M_l kappa_out(l) kappa_in(l) / sum_l M_l: the kept share of the cost."""
    one = torch.ones((), dtype=kappa.dtype, device=kappa.device)
    total = sum(c for c, _, _ in costs)
    kept = sum(c * (one if o is None else kappa[o]) * (one if i is None else kappa[i]) for c, o, i in costs)
    return kept / total


def unit(g: torch.Tensor) -> torch.Tensor:
    """``g`` scaled to norm 1 (0 stays 0): the direction of one loss's step on the keep-rates."""
    norm = g.norm()
    return g / norm if norm > 0 else g


def initial_scores(model: nn.Module, found: list[groups_mod.Group]) -> list[torch.Tensor]:
    """HYDRA's scaled initialisation per channel: sqrt(6 / fan_in) * magnitude / max magnitude."""
    modules = dict(model.named_modules())
    scores = []
    for group in found:
        magnitude = groups_mod.channel_magnitude(model, group).float()
        fan_in = modules[group.root].weight[0].numel()
        scores.append(math.sqrt(6.0 / fan_in) * magnitude / magnitude.max().clamp_min(1e-12))
    return scores


class MaskedModel(nn.Module):
    """``net`` with each group's channels masked by its learned scores (and keep-rate): the
    forward pass of HYDRA's and HARP's score learning. ``net`` is held outside the module
    tree, so it stays in eval mode and its weights are never parameters of this module.

    ``keep``: channels each group keeps (HYDRA) or, with ``rates``, the group's initial keep
    fraction (HARP); ``caps``: most channels each group may lose; ``round_to`` as the run's.
    """

    foldable = False   # its weights are made from the masks on every call (folding.folded)

    def __init__(self, net: nn.Module, found: list[groups_mod.Group], scores: list[torch.Tensor], keep: list[int],
                 caps: list[int], round_to: int, rates: bool):
        super().__init__()
        self.__dict__["net"] = net
        self.channels = [g.channels for g in found]
        self.keep, self.caps, self.round_to = keep, caps, round_to
        self.scores = nn.ParameterList(nn.Parameter(s.detach().clone()) for s in scores)
        names = {id(p): n for n, p in net.named_parameters()}
        self.members = [[(names[id(p)], p) for p in groups_mod.out_channel_params(net, g)] for g in found]
        self.rates = None
        if rates:
            self.rates = nn.Parameter(torch.tensor([k / c for k, c in zip(keep, self.channels)],
                                                   device=scores[0].device))
            self.lowest = torch.tensor([(c - cap) / c for c, cap in zip(self.channels, caps)],
                                       device=scores[0].device)

    def project(self) -> None:
        """Each keep-rate back into [1 - cap_g / C_g, 1] (after an optimizer step)."""
        if self.rates is not None:
            with torch.no_grad():
                self.rates.copy_(torch.maximum(self.rates.clamp(max=1.0), self.lowest))

    def kappa(self) -> torch.Tensor | None:
        """HARP's keep-rates, one per group (None for HYDRA)."""
        return self.rates

    def kept_channels(self) -> list[int]:
        """Channels each group's hard mask keeps now."""
        if self.rates is None:
            return list(self.keep)
        kappa = self.kappa().detach().cpu().tolist()
        return [c - allocation.removal_count(c, 1 - k, self.round_to, cap)
                for c, k, cap in zip(self.channels, kappa, self.caps)]

    def masks(self) -> list[torch.Tensor]:
        """Each group's mask (1 for its top-k scored channels, ``MASK_FLOOR`` for the others) with
        the straight-through gradients. Not 0: a channel zeroed before a ReLU gets no gradient at
        all (ReLU's derivative at 0 is 0), so a dropped channel could never come back; at the
        floor its gradient is the right-hand derivative of bringing it back, and the forward pass
        stays within 1e-3 of the pruned model's."""
        kappa = self.kappa()
        masks = []
        for g, (scores, k) in enumerate(zip(self.scores, self.kept_channels())):
            order = torch.argsort(scores.detach(), descending=True, stable=True)
            hard = torch.full_like(scores, MASK_FLOOR)
            hard[order[:k]] = 1
            mask = hard + scores - scores.detach()
            if kappa is not None:
                c = self.channels[g]
                rank = torch.empty_like(scores)
                rank[order] = torch.arange(c, dtype=scores.dtype, device=scores.device)
                soft = torch.sigmoid((kappa[g] * c - rank - 0.5) / max(1.0, SOFT_TOPK_WIDTH * c))
                mask = mask + soft - soft.detach()
            masks.append(mask)
        return masks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights: dict[str, torch.Tensor] = {}
        for mask, members in zip(self.masks(), self.members):
            for name, p in members:
                weights[name] = weights.get(name, p) * mask.view(-1, *([1] * (p.dim() - 1))).to(p.dtype)
        return torch.func.functional_call(self.net, weights, (x,))


@dataclasses.dataclass
class Learned:
    """What score learning found: per-group scores (lower goes first), HARP's removal rates."""

    scores: list[torch.Tensor]
    removal_rates: list[float] | None     # 1 - kappa_g (HARP), None for HYDRA
    history: list[dict]                   # one row per epoch


def learn(model: nn.Module, found: list[groups_mod.Group], keep: list[int], caps: list[int], params: Params,
          train_images: data_mod.ImageSet, spec, runtime: Runtime, teacher: nn.Module | None, state_dir: Path,
          step: int, resume_key: str, *, rates: bool, keep_target: float | None = None,
          costs: list | None = None, log=print) -> Learned:
    """HYDRA's (``rates`` False) or HARP's score learning on ``model``, whose weights and BN
    statistics are left bit-identical: ``prune.score_epochs`` epochs over the training images
    (shuffled and augmented as in training, seeded by seed, step and epoch), SGD at
    ``prune.score_lr`` with a cosine schedule. HARP also needs ``keep_target`` (K*, the kept
    share of ``costs`` the budget allows). The state is saved to ``state_dir`` after every
    epoch and an interrupted run resumes from its last completed epoch."""
    pp = params.prune
    net_flags = [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    masked = MaskedModel(model, found, initial_scores(model, found), keep, caps, pp.round_to, rates)
    optimizer = torch.optim.SGD(masked.scores.parameters(), lr=pp.score_lr, momentum=SCORE_MOMENTUM,
                                weight_decay=SCORE_WEIGHT_DECAY)
    rate_optimizer = None if masked.rates is None else torch.optim.SGD([masked.rates], lr=RATE_LR)
    batches = data_mod.Batches(train_images, params.train.batch_size, runtime.device, shuffle=True,
                               spec=spec if params.data.augment else None, channels_last=runtime.channels_last)
    total = pp.score_epochs * len(batches)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total))
    objective = objective_for(pp.finetune_method, teacher)
    adversary = training_adversary(params)
    key = json.dumps({"params": resume_key, "step": step, "channels": masked.channels, "keep": keep}, sort_keys=True)
    state_path = Path(state_dir) / STATE_FILE
    start, history = 0, []
    if state_path.is_file():
        state = load_checkpoint(state_path)
        if state.get("resume_key") == key:
            masked.load_state_dict(state["state_dict"])
            optimizer.load_state_dict(state["optimizer"])
            if rate_optimizer is not None:
                rate_optimizer.load_state_dict(state["rate_optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start, history = state["epoch"] + 1, state["history"]
            log(f"score learning: resuming after epoch {start}/{pp.score_epochs}")
    with seeded_scope(runtime.device), stopping.deferred():
        for epoch in range(start, pp.score_epochs):
            torch.manual_seed(params.seed * 100_003 + step * 1_009 + epoch)      # attack starts
            batches.seed = params.seed * 1_000_003 + step * 10_007 + epoch       # shuffling, augmentation
            started, loss_sum, seen = time.perf_counter(), 0.0, 0
            for batch, (x, y) in enumerate(batches):
                crash_point("batch")
                robust_weight, budget_weight = PHASES[min(len(PHASES) - 1,
                                                          (epoch * len(batches) + batch) * len(PHASES) // total)]
                with runtime.autocast():
                    loss, _ = objective(masked, x, y, adversary, params.train.beta)
                masked.zero_grad(set_to_none=True)
                (robust_weight * loss).backward()
                optimizer.step()
                if rate_optimizer is not None:
                    over = torch.relu(kept_cost(costs, masked.kappa()) - keep_target) / keep_target
                    budget = torch.autograd.grad(budget_weight * over, masked.rates)[0]   # 0 within the budget
                    masked.rates.grad = unit(masked.rates.grad) + unit(budget)
                    rate_optimizer.step()
                    masked.project()
                scheduler.step()
                loss_sum += float(loss.detach()) * len(y)
                seen += len(y)
                if stopping.requested():    # resumable after the last complete score epoch
                    raise stopping.Stopped(f"stopped by SIGTERM in score learning (step {step}, epoch {epoch + 1}/"
                                           f"{pp.score_epochs}); the same command resumes after score epoch {epoch}")
            kept = masked.kept_channels()
            row = {"epoch": epoch, "loss": loss_sum / seen, "seconds": time.perf_counter() - started,
                   "kept": kept}
            if rates:
                row["kept_cost"] = float(kept_cost(costs, masked.kappa().detach()))
            history.append(row)
            extra = {} if rate_optimizer is None else {"rate_optimizer": rate_optimizer.state_dict()}
            save_checkpoint(state_path, {"name": "scores"}, masked.state_dict(), optimizer=optimizer.state_dict(),
                            scheduler=scheduler.state_dict(), epoch=epoch, history=history, resume_key=key, **extra)
            log(f"score epoch {epoch + 1}/{pp.score_epochs}  loss {row['loss']:.4f}  kept {sum(kept)}/"
                f"{sum(masked.channels)} channels" + (f"  kept cost {row['kept_cost']:.1%} (target "
                                                      f"{keep_target:.1%})" if rates else ""))
    for p, flag in zip(model.parameters(), net_flags):
        p.requires_grad_(flag)
    scores = [s.detach().clone() for s in masked.scores]
    kappa = masked.kappa()
    return Learned(scores, None if kappa is None else (1 - kappa.detach().cpu()).tolist(), history)
