"""``mrpf export``: a dense or pruned checkpoint as standalone files that load without mrpf.

- ``model.onnx``: ONNX from ``torch.onnx.export`` (the dynamo exporter; it picks the opset),
  batch dimension dynamic; runs in ONNX Runtime.
- ``model.pt2``: ``torch.export``'s ExportedProgram (``torch.export.load``), batch dynamic.

Both take images in [0, 1], shape (N, 3, H, W), float32, and return logits: mrpf models
normalise inside (mrpf/models.py), so the exported graph does too. A pruned checkpoint is
exported as the physically smaller model it is (the pruning history replayed on load).
Parity is checked on export: both files' logits against mrpf's on the same images, the
largest absolute difference written to ``export.json``.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import torch

from . import devices
from .config import DeviceParams
from .errors import MrpfError
from .io import atomic_path, write_json
from .models import load_model

ONNX_FILE, PT2_FILE, SUMMARY_FILE = "model.onnx", "model.pt2", "export.json"
PARITY_TOLERANCE = 1e-4     # fp32: largest |logit difference| accepted on export


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise MrpfError(f"mrpf export needs onnx, onnxscript and onnxruntime ({e.name} is missing): "
                        f"pip install 'mrpf[deploy]'") from None
    return onnxruntime


def onnx_logits(path: str | Path, x: np.ndarray) -> np.ndarray:
    """Logits of an exported ONNX model in ONNX Runtime (CPU) for images ``x`` in [0, 1]."""
    ort = _require_onnx()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[0]


def pt2_logits(path: str | Path, x: torch.Tensor) -> torch.Tensor:
    """Logits of an exported program (``model.pt2``) for images ``x`` in [0, 1]."""
    program = torch.export.load(str(path))
    with torch.no_grad():
        return program.module()(x)


def export(checkpoint: str | Path, out_dir: str | Path, log=print, check_images: torch.Tensor | None = None) -> dict:
    """Write ``model.onnx``, ``model.pt2`` and ``export.json`` (parity, input spec) to ``out_dir``."""
    _require_onnx()
    out_dir = Path(out_dir)
    runtime = devices.setup(DeviceParams(name="cpu", channels_last=False), log)
    model, state = load_model(checkpoint, runtime)
    arch = state["arch"]
    size = arch["input_size"]
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=4096)
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / PT2_FILE) as tmp:
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        buffer = io.BytesIO()   # torch.export.save wants a .pt2 name or a buffer; the atomic temporary has neither
        torch.export.save(program, buffer)
        tmp.write_bytes(buffer.getvalue())
    with atomic_path(out_dir / ONNX_FILE) as tmp:
        onnx_program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=({0: batch},),
                                         input_names=["images"], output_names=["logits"], verbose=False)
        onnx_program.save(str(tmp))
    seconds = time.perf_counter() - started
    x = check_images if check_images is not None else torch.rand(16, 3, size, size,
                                                                  generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(x)
    differences = {"onnx": float(np.abs(onnx_logits(out_dir / ONNX_FILE, x.numpy()) - reference.numpy()).max()),
                   "pt2": float((pt2_logits(out_dir / PT2_FILE, x) - reference).abs().max())}
    worst = max(differences.values())
    if worst > PARITY_TOLERANCE:
        raise MrpfError(f"export of {checkpoint}: exported logits differ from mrpf's by up to {worst:.2e} "
                        f"(> {PARITY_TOLERANCE:g})")
    import onnx

    opset = next((o.version for o in onnx.load(str(out_dir / ONNX_FILE)).opset_import if o.domain in ("", "ai.onnx")),
                 None)
    summary = {"checkpoint": str(checkpoint), "arch": arch["name"], "pruned": bool(arch.get("pruning_history")),
               "input": {"shape": ["N", 3, size, size], "dtype": "float32", "range": [0, 1],
                         "normalisation": "inside the model"},
               "outputs": {"logits": ["N", arch["num_classes"]]}, "onnx_opset": opset,
               "max_abs_logit_difference": differences, "parity_images": len(x), "export_seconds": seconds,
               "files": [ONNX_FILE, PT2_FILE]}
    write_json(out_dir / SUMMARY_FILE, summary)
    log(f"exported {checkpoint} -> {out_dir / ONNX_FILE} (opset {opset}), {out_dir / PT2_FILE}; "
        f"max |logit difference| onnx {differences['onnx']:.1e}, pt2 {differences['pt2']:.1e}")
    return summary
