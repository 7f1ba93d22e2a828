"""The ``mrpf`` command line: one verb per pipeline stage.

Every verb takes ``--params FILE`` (default: ``params.yaml`` when it exists, else the
built-in defaults), a run name, and dotted overrides such as ``train.epochs=3``. Bad
input prints one line ``mrpf: error: ...`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__, stopping
from .config import PRUNE_METHODS, Params, as_float
from .errors import MrpfError

OVERRIDES_HELP = ("dotted parameter overrides, e.g. train.epochs=3 data.train_path=train.npz "
                  "(values are read as YAML; see params.yaml / mrpf/config.py for every key)")


def _sparsities(text: str) -> list[float]:
    """Comma-separated sparsities on the command line, each in (0, 1): ``0.5,0.7,0.9``."""
    values = []
    for part in text.split(","):
        try:
            value = as_float(part, "--sparsities")
        except MrpfError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if not 0 < value < 1:
            raise argparse.ArgumentTypeError(f"--sparsities: each must lie in (0, 1), got {part}")
        values.append(value)
    return values


def _floats(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def _common(p: argparse.ArgumentParser, run: bool = True) -> None:
    p.add_argument("--params", metavar="FILE",
                   help="params YAML (default: ./params.yaml if present, else built-in defaults)")
    if run:
        p.add_argument("--run", required=True, metavar="NAME", help="run name; outputs go to RUNS_DIR/NAME/")
        p.add_argument("--runs-dir", default="runs", metavar="DIR",
                       help="directory holding run folders (default: runs)")
    p.add_argument("--device", metavar="DEV", help="shortcut for device.name=DEV (auto, cpu, cuda, cuda:N)")
    p.add_argument("--threads", type=int, metavar="N", help="shortcut for device.threads=N (CPU threads)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``mrpf: error: ...``) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"mrpf: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="mrpf", description="Robustness-aware structured pruning (MRPF): train, evaluate, mrs, prune.")
    parser.add_argument("--version", action="version", version=f"mrpf {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True, parser_class=OneLineParser)

    p = verbs.add_parser("data", help="prepare a dataset's train/test splits as .npz (the pipeline's data stage)",
                         description="Write OUT/train.npz and OUT/test.npz from data.train_path/test_path, a copy "
                                     "under data.offline_dir, or the download (in that order).")
    _common(p, run=False)
    p.add_argument("--out", required=True, metavar="DIR", help="folder for train.npz and test.npz")

    p = verbs.add_parser("train", help="train a model (clean, PGD-AT, TRADES or MART); resumes if interrupted",
                         description="Train a model as params say. Writes RUNS_DIR/NAME/checkpoint.pt, "
                                     "train_metrics.json and history.csv (per-epoch metrics). An interrupted run "
                                     "resumes from its last completed epoch when started again.")
    _common(p)

    p = verbs.add_parser("evaluate", help="clean/FGSM/PGD/CW/AutoAttack accuracy, params, MACs, latency",
                         description="Evaluate a checkpoint on the test split. Writes a metrics JSON and "
                                     "per-image outcomes (*_per_image.npz) beside it.")
    _common(p)
    p.add_argument("--checkpoint", metavar="PATH", help="checkpoint to evaluate (default: RUNS_DIR/NAME/checkpoint.pt)")
    p.add_argument("--out", metavar="PATH", help="metrics JSON to write (default: RUNS_DIR/NAME/eval.json)")

    p = verbs.add_parser("mrs", help="Module Robustness Sensitivity of every prunable group of a checkpoint",
                         description="Measure MRS per dependency group on the calibration set and the ratios "
                                     "MRPF would allocate at prune.sparsity. Writes RUNS_DIR/NAME/mrs.json and "
                                     "mrs.png (bar chart of MRS and ratio per group).")
    _common(p)
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="the (adversarially trained) model to measure")
    p.add_argument("--sparsities", type=_sparsities, metavar="S,S,...",
                   help="sparsities at which to show MRPF's ratios in mrs.json and mrs.png, comma-separated "
                        "(default: prune.sparsity)")

    p = verbs.add_parser("prune", help="iterative prune + adversarial fine-tune (MRPF or a baseline)",
                         description="Prune a checkpoint to a global budget in prune.steps steps, fine-tuning "
                                     "after each. Writes RUNS_DIR/NAME/checkpoint.pt (pruned; `mrpf evaluate` "
                                     "reads it), prune.json (ratios, MRS, counts per step) and step*/ folders.")
    _common(p)
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="the dense model to prune")
    p.add_argument("--method", metavar="NAME", help=f"shortcut for prune.method=NAME ({', '.join(PRUNE_METHODS)})")
    p.add_argument("--sparsity", metavar="S", help="shortcut for prune.sparsity=S, in (0, 1)")
    p.add_argument("--mrs", metavar="PATH", help="the dense model's mrs.json (`mrpf mrs`): MRPF's first step uses it "
                                                 "instead of measuring MRS again (the same MRS settings required)")

    p = verbs.add_parser("report", help="tables and plots of every run of the active grid (reports/summary.md)",
                         description="Read RESULTS/**/eval.json of the params file's active grid and write "
                                     "OUT/summary.md, OUT/robustness.csv and OUT/robustness.png.")
    _workflow_args(p, "reports", "where the report goes")
    p.add_argument("--results", default="results", metavar="DIR", help="the pipeline's results folder")

    p = verbs.add_parser("import", help="a torchvision / timm model's state dict from elsewhere as an mrpf checkpoint",
                         description="Write RUNS_DIR/NAME/checkpoint.pt (a dense mrpf checkpoint of ARCH with the "
                                     "given weights; prefixes such as module. stripped) and evaluate it "
                                     "(RUNS_DIR/NAME/eval.json). Every later verb accepts the checkpoint.")
    _common(p)
    p.add_argument("--arch", required=True, metavar="NAME", help="tv:NAME or timm:NAME (or a registry name)")
    p.add_argument("--weights", required=True, metavar="PATH", help="state dict saved by torch.save")
    p.add_argument("--mean", type=_floats, metavar="R,G,B", help="input normalisation mean (default: the file's, "
                                                                 "else the dataset's)")
    p.add_argument("--std", type=_floats, metavar="R,G,B", help="input normalisation std (with --mean)")
    p.add_argument("--no-evaluate", dest="evaluate", action="store_false",
                   help="only write the checkpoint (the pipeline's evaluate stage evaluates it)")

    p = verbs.add_parser("export", help="a checkpoint as ONNX and torch.export (.pt2) files that load without mrpf",
                         description="Write OUT/model.onnx (ONNX Runtime), OUT/model.pt2 (torch.export.load) and "
                                     "OUT/export.json (input spec, logit parity with mrpf's model). Input: images "
                                     "in [0, 1], (N, 3, H, W), float32, any N; normalisation is inside.")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a dense or pruned mrpf checkpoint")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the exported files")

    p = verbs.add_parser("dvcyaml", help="write dvc.yaml for the active grid (the DVC side of the pipeline)",
                         description="Expand the params file's active grid into dvc.yaml: the same stages, "
                                     "commands and outputs as the Snakefile's (mrpf/workflow.py).")
    _workflow_args(p, None, "file to write", "dvc.yaml in the grid's out folder, else here")
    return parser


def _workflow_args(p: argparse.ArgumentParser, out: str | None, out_help: str, default_help: str = "") -> None:
    """Arguments of the verbs that read the whole params.yaml (its grids), not one run's params."""
    p.add_argument("--params", default="params.yaml", metavar="FILE",
                   help="params YAML with grids (default: params.yaml)")
    p.add_argument("--out", default=out, metavar="PATH", help=f"{out_help} (default: {default_help or out})")
    p.add_argument("overrides", nargs="*", metavar="grid=NAME", help="grid=NAME picks another grid")


def _workflow_config(args: argparse.Namespace) -> dict:
    """params.yaml as the pipeline sees it (structure validated), with ``grid=NAME`` applied."""
    from . import workflow

    return workflow.load_config(args.params, args.overrides)


def _params(args: argparse.Namespace) -> Params:
    from .config import load_params

    path = args.params
    if path is None and Path("params.yaml").is_file():
        path = "params.yaml"
    overrides = list(args.overrides)
    if args.device is not None:
        overrides.append(f"device.name={args.device}")
    if args.threads is not None:
        overrides.append(f"device.threads={args.threads}")
    if getattr(args, "method", None) is not None:
        overrides.append(f"prune.method={args.method}")
    if getattr(args, "sparsity", None) is not None:
        overrides.append(f"prune.sparsity={args.sparsity}")
    return load_params(path, overrides)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse, accepting KEY=VALUE overrides anywhere on the line (not only after the options)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    for token in extra:
        if token.startswith("-") or "=" not in token or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides.append(token)
    return args


def run(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.verb == "report":
        from .reporting import write_report

        rows = write_report(_workflow_config(args), args.results, args.out, log=_log)
        _log(f"wrote {Path(args.out) / 'summary.md'} ({len(rows)} rows), robustness.csv and robustness.png")
        return 0
    if args.verb == "export":
        from .export import export

        export(args.checkpoint, args.out, log=_log)
        return 0
    if args.verb == "dvcyaml":
        import yaml

        from . import workflow
        from .io import atomic_path

        config = _workflow_config(args)
        out = args.out or workflow.dvc_yaml_path(workflow.active_grid(config)[1])
        with atomic_path(out) as tmp:
            tmp.write_text(f"# Generated by `mrpf dvcyaml` from {args.params} (grid: {config['grid']}); "
                           "do not edit: change params.yaml or mrpf/workflow.py and regenerate.\n"
                           + yaml.safe_dump(workflow.dvc_yaml(config, args.params), sort_keys=False, width=120))
        _log(f"wrote {out} (grid {config['grid']})")
        return 0
    params = _params(args)
    if args.verb == "data":
        from .data import prepare

        prepare(params.data, args.out, log=_log)
        return 0
    run_dir = Path(args.runs_dir) / args.run
    if args.verb == "train":
        from .training import train

        summary = train(params, run_dir, log=_log)
        _log(f"wrote {run_dir / 'checkpoint.pt'}  (val clean {summary.get('val_clean_acc', float('nan')):.4f}, "
             f"val PGD {summary.get('val_pgd_acc') or float('nan'):.4f}, {summary.get('train_seconds', 0):.0f}s)")
    elif args.verb == "evaluate":
        from .evaluation import evaluate

        checkpoint = Path(args.checkpoint) if args.checkpoint else run_dir / "checkpoint.pt"
        out = Path(args.out) if args.out else run_dir / "eval.json"
        evaluate(params, checkpoint, out, log=_log)
        _log(f"wrote {out}")
    elif args.verb == "import":
        from .evaluation import evaluate
        from .importing import import_model

        import_model(params, args.arch, args.weights, run_dir, log=_log, mean=args.mean, std=args.std)
        if args.evaluate:
            metrics = evaluate(params, run_dir / "checkpoint.pt", run_dir / "eval.json", log=_log)
            _log(f"wrote {run_dir / 'eval.json'} (clean {metrics.get('clean_acc', float('nan')):.4f})")
    elif args.verb == "mrs":
        from .sensitivity import run_mrs

        result = run_mrs(params, args.checkpoint, run_dir, log=_log, sparsities=args.sparsities)
        _log(f"wrote {run_dir / 'mrs.json'} and mrs.png ({len(result['groups'])} groups, {result['seconds']:.0f}s)")
    elif args.verb == "prune":
        from .pruning import run_prune

        summary = run_prune(params, args.checkpoint, run_dir, log=_log, mrs_path=args.mrs)
        _log(f"wrote {run_dir / 'checkpoint.pt'} ({summary['method']}: {summary['achieved']:.1%} "
             f"{summary['metric']} removed)")
    return 0


def main(argv: list[str] | None = None) -> None:
    stopping.install()
    try:
        code = run(argv)
    except MrpfError as e:
        print(f"mrpf: error: {e}", file=sys.stderr)
        code = 2
    except stopping.Stopped as e:
        print(f"mrpf: {e}", file=sys.stderr)
        code = stopping.STOPPED_STATUS
    except KeyboardInterrupt:
        print("mrpf: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
