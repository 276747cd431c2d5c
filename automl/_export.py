"""Export one trial of a study as a deployable folder, verified before it is reported as done.

The folder holds:

- ``model.ts``: the trial's TorchScript model, byte for byte the file the trial measured;
- ``model.onnx``: ONNX made from that TorchScript model (see :mod:`automl._onnx` for why and how);
- ``weights.safetensors`` (or ``weights.pt``, weights-only, where a state dict holds non-tensor
  entries such as packed quantised weights that safetensors cannot store);
- ``card.json``: study, trial, method chain and parameters, recorded and re-measured numbers,
  environment; ``README.md``: how to load and run it.

Export works only from what a trial saved (plan, metrics, checkpoint), never from which method made
it, so every method family exports the moment it exists. It is all-or-nothing: files go to a hidden
``.partial`` folder next to the destination that is renamed into place only after every check
passes, and removed on any failure.

Checks (any failing one aborts the export):

1. the checkpoint exists and loads (``torch.jit.load``, ``torch.load(weights_only=True)``, JSON);
2. the exported TorchScript model's test accuracy equals the trial's recorded accuracy (the same
   number of correct test samples, i.e. ``|diff| < 0.5 / n_test``), evaluated exactly as trials do;
3. ONNX Runtime's outputs equal PyTorch's within ``1e-4`` (max absolute difference of the logits on
   the whole test split); for int8 models, whose integer kernels round differently in the two
   runtimes, the same test accuracy and the same prediction on >= 99 % of the samples instead (the
   card records the logit difference). An ONNX file that fails (or that cannot be made) is not
   shipped, and ``card.json`` says why under ``onnx`` (the TorchScript export still succeeds);
4. the weights file reloads (weights-only) to tensors equal to the exported model's state dict.

Latency is then re-measured on the exported files in a fresh Python process that does nothing else
(``python -m automl._export latency ...``), with the study's latency settings, and written next to the
recorded value; it is information, not a pass/fail check, because the machine may be busy.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from automl import _onnx as onnx_export
from automl._pareto import FrontRow, StudyView

__all__ = ["ExportError", "LoadedCheckpoint", "export_trial", "load_study_data", "load_trial_checkpoint"]


def _jit_load(path: Path) -> torch.jit.ScriptModule:
    # torch.jit.load warns on every call that TorchScript is deprecated; TorchScript is what trials
    # save and the one format that keeps data-dependent control flow, so the warning is only noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu")


class ExportError(RuntimeError):
    """An export cannot proceed; ``code`` is the exit status (2 = bad input/checkpoint, 1 = check failed)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class LoadedCheckpoint:
    folder: Path
    model: torch.jit.ScriptModule
    record: dict[str, Any]
    state_dict: dict[str, Any]


def load_trial_checkpoint(study_dir: Path, row: FrontRow) -> LoadedCheckpoint:
    """Load and validate a trial's checkpoint (TorchScript, weights-only state dict, ``trial.json``).

    Raises:
        ExportError: (code 2) the folder or a file is missing, or a file does not load.
    """
    if row.checkpoint is None:
        raise ExportError(f"trial {row.number} has no checkpoint recorded (user attr 'checkpoint' is missing)")
    folder = (study_dir / row.checkpoint).resolve()
    where = f"trial {row.number}: checkpoint {folder}"
    if not folder.is_dir():
        raise ExportError(f"{where} is missing")
    missing = [n for n in ("model.ts", "weights.pt", "trial.json") if not (folder / n).is_file()]
    if missing:
        raise ExportError(f"{where} is incomplete: missing {', '.join(missing)}")
    try:
        record = json.loads((folder / "trial.json").read_text())
        if not isinstance(record, dict) or "metrics" not in record or "plan" not in record:
            raise ValueError("trial.json lacks 'plan' or 'metrics'")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ExportError(f"{where} is corrupted: trial.json: {exc}") from None
    try:
        model = _jit_load(folder / "model.ts")
    except Exception as exc:  # noqa: BLE001 - any load failure means the file is damaged
        raise ExportError(f"{where} is corrupted: model.ts does not load ({type(exc).__name__}: {_first_line(exc)})") from None
    try:
        state = torch.load(folder / "weights.pt", map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"expected a state dict, got {type(state).__name__}")
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"{where} is corrupted: weights.pt does not load weights-only ({type(exc).__name__}: {_first_line(exc)})") from None
    return LoadedCheckpoint(folder, model.eval(), record, state)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def load_study_data(cfg: Any):
    """The study's dataset splits, built exactly as the study built them (same seeds and fractions)."""
    from automl._data import dataset_from_config

    # Export never downloads: the data must already be where the study had it.
    return dataset_from_config(cfg.dataset, download=False)


# --- ONNX ---------------------------------------------------------------------------------


def _onnx_session(path: Path, threads: int = 1):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _check_onnx(exported: torch.jit.ScriptModule, path: Path, data: Any, n_test: int) -> dict[str, Any]:
    """Compare ONNX Runtime with PyTorch on the whole test split (batches of 500, as trials evaluate).

    An ONNX file that fails :func:`automl._onnx.compare` is rejected rather than shipped: it would
    be a different model from the one the card describes. Float models must match to 1e-4; int8
    ones (integer kernels round differently) must reach the same accuracy with (almost) the same
    predictions.
    """
    try:
        sess = _onnx_session(path)
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime lacks a kernel or rejects the graph
        return {"status": "rejected", "reason": f"ONNX Runtime cannot load the model: {type(exc).__name__}: {_first_line(exc)}"}
    quantized = onnx_export.is_quantized(exported)
    max_diff, correct, correct_torch, agree = 0.0, 0, 0, 0
    with torch.no_grad():
        for x, y in data.batches("test", 500):
            ref = exported(x)
            got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
            if got.shape != ref.shape:
                return {"status": "rejected", "reason": f"ONNX output shape {tuple(got.shape)} != PyTorch {tuple(ref.shape)}"}
            max_diff = max(max_diff, float((got - ref).abs().max()))
            correct += int((got.argmax(1) == y).sum())
            correct_torch += int((ref.argmax(1) == y).sum())
            agree += int((got.argmax(1) == ref.argmax(1)).sum())
    info = {
        "opset": onnx_export.OPSET,
        "max_abs_diff_vs_torch": max_diff,
        "accuracy": correct / max(n_test, 1),
        "predictions_equal": agree,
        "quantized": quantized,
        "criterion": f"int8: same test accuracy, same prediction on >= {onnx_export.INT8_AGREEMENT:.0%} of samples" if quantized else f"max |diff| <= {onnx_export.ATOL:g}",
    }
    reason = onnx_export.compare(max_diff, agree, n_test, correct, correct_torch, quantized=quantized)
    if reason is not None:
        return {"status": "rejected", "reason": f"{reason}; model.onnx not shipped", **info}
    return {"status": "ok", **info}


# --- weights ------------------------------------------------------------------------------


def _write_weights(state: dict[str, Any], folder: Path) -> str:
    """``weights.safetensors`` if every entry is a plain tensor, else a weights-only ``weights.pt``."""
    plain = all(isinstance(v, torch.Tensor) and not v.is_quantized for v in state.values())
    if plain:
        from safetensors.torch import save_file

        # safetensors refuses shared or non-contiguous storage: store independent copies.
        save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(folder / "weights.safetensors"))
        os.chmod(folder / "weights.safetensors", 0o644)  # safetensors writes 0600; the folder is meant to be shared
        return "weights.safetensors"
    torch.save(state, folder / "weights.pt")
    return "weights.pt"


def _reload_weights(path: Path) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _same_weights(saved: dict[str, Any], model: dict[str, Any]) -> str | None:
    """None if every tensor of the exported model's state dict is in ``saved`` and equal, else what differs.

    ``saved`` may hold more: a TorchScript state dict omits entries kept in script objects (packed
    int8 weights of torch.ao quantised layers), which the eager state dict in the checkpoint has.
    """
    ts = {k: v for k, v in saved.items() if isinstance(v, torch.Tensor)}
    tm = {k: v for k, v in model.items() if isinstance(v, torch.Tensor)}
    missing = sorted(set(tm) - set(ts))
    if missing:
        return f"{len(missing)} tensors of the model are not in the file, e.g. {missing[:3]}"
    for k in tm:
        x, y = ts[k], tm[k]
        if x.is_quantized or y.is_quantized:
            x, y = x.dequantize(), y.dequantize()
        if x.shape != y.shape or not torch.equal(x, y):
            return f"tensor {k!r} differs"
    return None


# --- latency in a fresh process -------------------------------------------------------------


def _fresh_latency(folder: Path, example: torch.Tensor, latency: Any, has_onnx: bool, timeout: float = 600.0) -> dict[str, Any]:
    """Median/IQR latency of the exported files, measured by a new Python process doing nothing else.

    ``example`` is the batch-1 test sample trials time (a real input, so a model whose forward
    depends on the data takes the path it takes in use); it travels as a weights-only tensor file.
    """
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        torch.save(example.detach().cpu().contiguous(), Path(tmp) / "example.pt")
        return _run_latency_process(folder, Path(tmp) / "example.pt", latency, has_onnx, timeout)


def _run_latency_process(folder: Path, example: Path, latency: Any, has_onnx: bool, timeout: float) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "automl._export", "latency", str(folder),
        "--example", str(example),
        "--batch-size", str(latency.batch_size), "--threads", str(latency.threads),
        "--warmup", str(latency.warmup), "--repeats", str(latency.repeats),
    ]
    if has_onnx:
        cmd.append("--onnx")
    env = dict(os.environ)
    # The worker must import this same code (an editable install or PYTHONPATH already point here).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["latency process failed"])[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _latency_main(argv: list[str]) -> int:
    import argparse

    from automl._measure import LatencySettings, measure_latency

    ap = argparse.ArgumentParser(prog="python -m automl._export latency")
    ap.add_argument("folder")
    ap.add_argument("--example", required=True, help="a batch-1 input saved with torch.save")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--onnx", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = LatencySettings(batch_size=args.batch_size, threads=args.threads, warmup=args.warmup, repeats=args.repeats)
    folder = Path(args.folder)
    example = torch.load(args.example, map_location="cpu", weights_only=True)
    shape = list(example.shape[1:])
    model = _jit_load(folder / "model.ts").eval()
    median, iqr = measure_latency(model, example, settings)
    out: dict[str, Any] = {"torchscript_ms": median, "torchscript_iqr_ms": iqr}
    if args.onnx:
        import statistics

        sess = _onnx_session(folder / "model.onnx", args.threads)
        x = example.expand(args.batch_size, *shape).contiguous().numpy()
        feed = {sess.get_inputs()[0].name: x}
        for _ in range(args.warmup):
            sess.run(None, feed)
        start = time.perf_counter()
        sess.run(None, feed)
        once = time.perf_counter() - start
        number = max(1, min(1000, int(0.002 / max(once, 1e-7))))
        blocks = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for _ in range(number):
                sess.run(None, feed)
            blocks.append((time.perf_counter() - t0) / number * 1e3)
        q = statistics.quantiles(blocks, n=4)
        out.update({"onnxruntime_ms": statistics.median(blocks), "onnxruntime_iqr_ms": q[2] - q[0]})
    print(json.dumps(out))
    return 0


# --- environment ------------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(latency: Any) -> dict[str, Any]:
    import importlib.metadata as md

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "versions": {p: version(p) for p in ("torch", "onnx", "onnxruntime", "safetensors", "optuna", "ray", "automl-compress")},
        "latency": {"batch_size": latency.batch_size, "threads": latency.threads, "warmup": latency.warmup, "repeats": latency.repeats},
    }


# --- the export ---------------------------------------------------------------------------


def _usage(card: dict[str, Any]) -> str:
    shape = ", ".join(str(s) for s in card["input_shape"])
    weights = card["files"]["weights"]
    load_w = (
        'from safetensors.torch import load_file\nstate = load_file("weights.safetensors")'
        if weights.endswith(".safetensors")
        else 'state = torch.load("weights.pt", weights_only=True)'
    )
    onnx = card["onnx"]
    onnx_part = (
        f"""## ONNX Runtime (no PyTorch needed)

```python
import numpy as np, onnxruntime as ort
sess = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
logits = sess.run(None, {{"input": np.zeros((1, {shape}), np.float32)}})[0]
```
"""
        if onnx.get("status") == "ok"
        else f"## ONNX\n\nNot exported: {onnx.get('reason')}\n"
    )
    m = card["metrics"]["recorded"]
    return f"""# Trial {card['trial']} of study {card['study']}: {card['method']}

Test accuracy {m.get('accuracy')} (re-verified on export), size {m.get('size_bytes')} bytes,
latency {m.get('latency_ms')} ms recorded / {card['metrics']['exported'].get('latency_ms')} ms re-measured
(batch {card['environment']['latency']['batch_size']}, {card['environment']['latency']['threads']} thread(s)).
Input: float32 tensor of shape (batch, {shape}), preprocessed as in the study's dataset `{card.get('dataset')}`.
Output: logits (batch, classes). All numbers and the method chain are in `card.json`.

## TorchScript (needs only torch)

```python
import torch
model = torch.jit.load("model.ts").eval()
logits = model(torch.zeros(1, {shape}))
```

{onnx_part}
## Weights

`{weights}` holds the state dict (keys match `model.ts`), loadable without unpickling code:

```python
{load_w}
```
"""


def export_trial(
    view: StudyView,
    row: FrontRow,
    out: Path,
    *,
    study_dir: Path,
    load_data: Callable[[], Any],
    latency: Any,
    force: bool = False,
    measure_latency: bool = True,
    log: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Export ``row``'s trial to ``out`` after verifying it; returns the card.

    Args:
        load_data: returns the study's :class:`~automl._data.Splits` (called only once the
            checkpoint is known to be good).
        latency: the study's latency settings (``batch_size``, ``threads``, ``warmup``, ``repeats``).
        force: replace an existing ``out`` folder.

    Raises:
        ExportError: code 2 for a missing/corrupted checkpoint or an existing ``out``; code 1 when a
            verification fails. Nothing is left on disk in either case.
    """
    from automl._train import evaluate

    out = Path(out)
    if out.exists() and not force:
        raise ExportError(f"output folder {out} already exists; pass --force to replace it or --out to choose another")
    ckpt = load_trial_checkpoint(study_dir, row)
    recorded = dict(row.metrics)
    for k, v in ckpt.record.get("metrics", {}).items():
        if recorded.get(k) is None:
            recorded[k] = v
    if recorded.get("accuracy") is None:
        raise ExportError(f"trial {row.number} has no recorded accuracy to verify against")
    data = load_data()
    input_shape = list(ckpt.record.get("input_shape") or data.input_shape)

    created_parent = not out.parent.exists()
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        tmp.mkdir(parents=True, exist_ok=False)
        shutil.copyfile(ckpt.folder / "model.ts", tmp / "model.ts")
        weights_name = _write_weights(ckpt.state_dict, tmp)

        # 1. accuracy of the exported TorchScript file, evaluated as trials evaluate.
        exported = _jit_load(tmp / "model.ts").eval()
        n_test = data.n("test")
        with torch.no_grad():
            acc = evaluate(exported, data, "test")
        if abs(acc - float(recorded["accuracy"])) >= 0.5 / max(n_test, 1):
            raise ExportError(
                f"verification failed: exported model's test accuracy {acc:.6f} != recorded {float(recorded['accuracy']):.6f} "
                f"({n_test} test samples)",
                code=1,
            )
        log(f"verified: TorchScript test accuracy {acc:.4f} equals the recorded {float(recorded['accuracy']):.4f}")

        # 2. weights file == exported model's weights.
        diff = _same_weights(_reload_weights(tmp / weights_name), exported.state_dict())
        if diff is not None:
            raise ExportError(f"verification failed: {weights_name} does not match model.ts: {diff}", code=1)

        # 3. ONNX, checked against PyTorch on the whole test split.
        onnx_info: dict[str, Any]
        try:
            onnx_export.to_onnx(exported, data.example(), tmp / "model.onnx")
        except Exception as exc:  # noqa: BLE001 - say what does not export instead of failing the whole export
            (tmp / "model.onnx").unlink(missing_ok=True)
            onnx_info = {"status": "unsupported", "reason": f"torch.onnx.export failed: {type(exc).__name__}: {_first_line(exc)}"}
            log(f"ONNX: not exported ({onnx_info['reason']})")
        else:
            onnx_info = _check_onnx(exported, tmp / "model.onnx", data, n_test)
            if onnx_info["status"] == "ok":
                log(f"verified: ONNX Runtime matches PyTorch ({onnx_info['criterion']}; max |diff| {onnx_info['max_abs_diff_vs_torch']:.2e}), accuracy {onnx_info['accuracy']:.4f}")
            else:
                (tmp / "model.onnx").unlink(missing_ok=True)
                log(f"ONNX: not shipped ({onnx_info['reason']})")

        # 4. latency of the exported files in a fresh, otherwise idle process.
        fresh = _fresh_latency(tmp, data.example(), latency, onnx_info["status"] == "ok") if measure_latency else {"skipped": True}
        if "torchscript_ms" in fresh:
            log(f"latency: {fresh['torchscript_ms']:.3f} ms re-measured in a fresh process (recorded {recorded.get('latency_ms') or float('nan'):.3f} ms)")

        plan = ckpt.record.get("plan", {})
        card = {
            "study": view.name,
            "study_dir": str(study_dir.resolve()),
            "dataset": view.attrs.get("dataset"),
            "base_model": view.attrs.get("base_model"),
            "trial": row.number,
            "ray_trial_id": row.attrs.get("ray_trial_id"),
            "method": row.method,
            "chain": plan.get("chain", []),
            "finetune": plan.get("finetune", {}),
            "search_params": row.params,
            "notes": ckpt.record.get("notes", {}),
            "input_shape": input_shape,
            "objectives": dict(zip(view.objectives, view.directions)),
            "on_front": any(r.number == row.number for r in view.front),
            "metrics": {
                "recorded": recorded,
                "exported": {
                    "accuracy": acc,
                    "accuracy_onnx": onnx_info.get("accuracy"),
                    "latency_ms": fresh.get("torchscript_ms"),
                    "latency_iqr_ms": fresh.get("torchscript_iqr_ms"),
                    "latency_onnxruntime_ms": fresh.get("onnxruntime_ms"),
                    "latency_onnxruntime_iqr_ms": fresh.get("onnxruntime_iqr_ms"),
                    "latency_error": fresh.get("error"),
                    "size_bytes_weights_file": (tmp / weights_name).stat().st_size,
                    "n_test": n_test,
                },
                "base": view.base,
                "compression": row.compression,
                "speedup": row.speedup,
            },
            "onnx": onnx_info,
            "files": {"torchscript": "model.ts", "onnx": "model.onnx" if onnx_info["status"] == "ok" else None, "weights": weights_name, "usage": "README.md"},
            "environment": environment(latency),
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / "card.json").write_text(json.dumps(card, indent=2, default=str))
        (tmp / "README.md").write_text(_usage(card))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        return card
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created_parent:
            try:
                out.parent.rmdir()
            except OSError:
                pass
        raise


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "latency":
        sys.exit(_latency_main(sys.argv[2:]))
    sys.exit("usage: python -m automl._export latency FOLDER --example EXAMPLE.pt [...]")
