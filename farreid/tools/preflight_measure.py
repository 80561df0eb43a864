"""What ``farreid preflight`` measures: step times and peak memory inside Lightning's fit loop, the loader alone,
one evaluation batch, parameter counts per group, and the verdict."""

from __future__ import annotations

import math
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

# The group a trainable parameter is counted in, by its name in the module.
_GROUPS = (("head_", "heads"), ("pooling.", "pooling"), ("text.", "text"), ("objectives.", "objectives"))


def parameter_counts(module: torch.nn.Module) -> dict:
    """Total and trainable parameters, and the trainable ones per group: the pretrained backbone blocks that train
    (``backbone_blocks``), ``adapters``, ``prompts``, other new backbone parameters, ``heads``, ``pooling``,
    ``text`` (stage 1's context vectors) and ``objectives``."""
    new = {f"backbone.{name}" for name, _ in module.backbone.new_parameters()}
    groups: dict[str, int] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if name in new:
            group = "adapters" if "adapter" in name else "prompts" if "prompt" in name else "backbone_new"
        elif name.startswith("backbone."):
            group = "backbone_blocks"
        else:
            group = next((g for prefix, g in _GROUPS if name.startswith(prefix)), "other")
        groups[group] = groups.get(group, 0) + param.numel()
    return {
        "total": sum(p.numel() for p in module.parameters()),
        "trainable": sum(groups.values()),
        "trainable_by_group": dict(sorted(groups.items())),
    }


def is_out_of_memory(err: BaseException) -> bool:
    """A GPU or host allocation failure (what a smaller setting fixes), not any other error."""
    if isinstance(err, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    scale = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{os.cpu_count()} CPU cores ({platform.machine()})"


def _capacity(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


class StepProbe(Callback):
    """Times the fit loop's steps (from ``on_train_batch_start`` to ``on_train_batch_end``: forward, backward and
    optimizer step, synchronised on a GPU) after ``warmup`` steps, and then measures what the fit loop does not."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.run_dir: Path | None = None
        self.planned: dict = {}  # the run the config describes (max_epochs, max_steps), set by the CLI
        self.times: list[float] = []
        self.frames_per_step = 0
        self.info: dict = {}
        self.error: str | None = None
        self._device = torch.device("cpu")
        self._start = 0.0
        self._seen = 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._device = pl_module.device
        self.planned["depth"] = len(getattr(pl_module.backbone, "blocks", ()))
        if self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)
        self.info.update(
            device=str(self._device),
            device_name=_device_name(self._device),
            capacity_bytes=_capacity(self._device),
            precision=str(trainer.precision),
            world_size=trainer.world_size,
            parameters=parameter_counts(pl_module),
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.info["steps_per_epoch"] = int(trainer.num_training_batches)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        _sync(self._device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _sync(self._device)
        elapsed = time.perf_counter() - self._start
        self._seen += 1
        if self._seen > self.warmup:
            self.times.append(elapsed)
        self.frames_per_step = int(batch["frames"].shape[0] * batch["frames"].shape[1])  # B clips x T frames

    def out_of_memory(self, err: BaseException) -> None:
        self.error = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"

    # ----------------------------------------------------------------------- after the fit loop's steps
    def after_steps(self, trainer: L.Trainer, module: L.LightningModule, datamodule, batches: int) -> None:
        """The loader alone over ``batches`` batches (after ``warmup``) and one evaluation batch."""
        self.info["peak_memory_bytes"] = _peak_memory(self._device)
        loader = datamodule.train_dataloader()
        iterator, times = iter(loader), []
        for i in range(self.warmup + batches):
            start = time.perf_counter()
            batch = next(iterator, None)
            if batch is None:  # the epoch (or the part the fit loop left) ended: the next one, as fit goes on
                iterator = iter(loader)
                batch = next(iterator)
            batch = datamodule.on_after_batch_transfer(trainer.strategy.batch_to_device(batch), 0)
            _sync(self._device)
            if i >= self.warmup:
                times.append(time.perf_counter() - start)
        del iterator
        if times:
            self.info["loader_batch_s"] = statistics.median(times)
        self._evaluation_batch(trainer, module, datamodule)
        self.info["peak_memory_bytes"] = max(self.info["peak_memory_bytes"], _peak_memory(self._device))

    def _evaluation_batch(self, trainer: L.Trainer, module: L.LightningModule, datamodule) -> None:
        name = "val" if "val" in datamodule.eval_sets else None
        if name is None:
            return
        loader = datamodule.val_dataloader()
        batch = datamodule.on_after_batch_transfer(trainer.strategy.batch_to_device(next(iter(loader))), 0)
        module.eval()
        with torch.inference_mode(), trainer.precision_plugin.forward_context():
            module.validation_step(batch, 0)  # the first call pays one-off costs (kernels, caches)
            _sync(self._device)
            start = time.perf_counter()
            module.validation_step(batch, 0)
            _sync(self._device)
            elapsed = time.perf_counter() - start
        module.train()
        batch_size = datamodule.hparams.batch_size_test
        sets = {"val": len(datamodule.eval_sets["val"])}
        try:
            sets["test"] = len(datamodule.reader.test_set())
        except (FileNotFoundError, ValueError):  # no released case folders under this root
            pass
        self.info["eval_batch_s"] = elapsed
        self.info["eval_clips_per_batch"] = int(batch["frames"].shape[0])
        self.info["projected_eval_s"] = {k: elapsed * math.ceil(n / batch_size) for k, n in sets.items()}

    def report(self) -> dict:
        """The preflight report: measurements, projections and the verdict (see ``farreid.tools.preflight``)."""
        out = {**self.info, "planned": self.planned, "measured_steps": len(self.times)}
        out.setdefault("peak_memory_bytes", _peak_memory(self._device))
        if self.times:
            step = statistics.median(self.times)
            out["step_time_s"] = step
            out["model_frames_per_s"] = self.frames_per_step / step
            loader = out.get("loader_batch_s")
            if loader:
                out["loader_frames_per_s"] = self.frames_per_step / loader
                out["bottleneck"] = "loader" if loader > step else "model"
            per_step = max(step, loader or 0.0)
            steps = out.get("steps_per_epoch", 0)
            out["projected_epoch_s"] = per_step * steps
            epochs, max_steps = self.planned.get("max_epochs"), self.planned.get("max_steps") or -1
            total = max_steps if max_steps > 0 else (epochs or 0) * steps
            if max_steps > 0 and epochs:
                total = min(max_steps, epochs * steps)
            out["projected_run_s"] = per_step * total
        out.update(verdict(out, self.error, self.planned))
        return out


def verdict(measured: dict, error: str | None, planned: dict) -> dict:
    """``fits`` with the share of the device used, or ``out_of_memory`` with the settings to change, first first."""
    if error is None:
        share = measured["peak_memory_bytes"] / max(measured.get("capacity_bytes", 1), 1)
        return {"verdict": "fits", "memory_share": share}
    advice = []
    blocks, depth = planned.get("checkpoint_blocks"), planned.get("depth")
    if blocks is not None and depth and blocks < depth:
        advice.append(f"model.backbone.init_args.checkpoint_blocks (now {blocks} of {depth}): recompute more blocks")
    if str(planned.get("precision")).startswith("32"):
        advice.append("trainer.precision bf16-mixed (now 32-bit)")
    advice.append(f"data.p x data.k (now {planned.get('p')} x {planned.get('k')} clips per step)")
    advice.append(f"data.num_frames (now {planned.get('num_frames')})")
    return {"verdict": "out_of_memory", "error": error, "change_first": advice[0], "changes": advice}


def _count(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def table(report: dict) -> str:
    """The report as a short table for the terminal."""
    gib = 2**30
    rows = [
        (
            "verdict",
            report["verdict"]
            + (
                f" ({100 * report['memory_share']:.0f}% of the device)"
                if "memory_share" in report
                else f": change {report.get('change_first')}"
            ),
        )
    ]
    rows.append(("device", f"{report.get('device')} ({report.get('device_name', '')}), {report.get('precision')}"))
    params = report.get("parameters")
    if params:
        groups = ", ".join(f"{k} {_count(v)}" for k, v in params["trainable_by_group"].items())
        rows.append(("parameters", f"{_count(params['total'])}, trainable {_count(params['trainable'])}"))
        rows.append(("  trainable", groups))
    rows.append(
        ("peak memory", f"{report['peak_memory_bytes'] / gib:.2f} of {report.get('capacity_bytes', 0) / gib:.1f} GiB")
    )
    for key, label, unit in (
        ("step_time_s", "step time (median)", "s"),
        ("model_frames_per_s", "model", "frames/s"),
        ("loader_frames_per_s", "loader alone", "frames/s"),
        ("steps_per_epoch", "steps per epoch", ""),
        ("projected_epoch_s", "epoch (projected)", "s"),
        ("projected_run_s", "run (projected)", "s"),
        ("eval_batch_s", "eval batch", "s"),
    ):
        if key in report:
            value = report[key]
            rows.append((label, f"{value:,.3f} {unit}" if isinstance(value, float) else f"{value} {unit}"))
    if "bottleneck" in report:
        rows.append(("bound by", report["bottleneck"]))
    for name, seconds in (report.get("projected_eval_s") or {}).items():
        rows.append((f"{name} evaluation (projected)", f"{seconds:,.1f} s"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(["farreid preflight", *(f"  {k:<{width}}  {v}" for k, v in rows)])
