"""One output root per run, and nothing of an earlier run overwritten.

Every path a ``fedrefine`` run writes derives from ``trainer.default_root_dir`` (or ``--run_name NAME``, which
sets it to ``runs/NAME``)::

    <root>/config.yaml           fit's resolved config (feed it back: ``fedrefine test --config <root>/config.yaml``)
    <root>/<stage>_config.yaml   the resolved config of test / validate / predict (fit's is never rewritten)
    <root>/checkpoints/          ModelCheckpoint's files (``last.ckpt`` is always this run's)
    <root>/fuser/                the exported fuser (``gate/`` for a gating network)
    <root>/test_results.json     the results, and ``test_samples.jsonl``: one record per question and route
    <root>/wandb/, <root>/csv/   the loggers' files

A path the config spells out is kept. ``fit`` refuses a root that holds an earlier run's fuser or checkpoints, and
``test`` one that holds results, unless ``--overwrite true`` (or ``--ckpt_path`` resumes the run). The trainer's
precision, when left ``null``, is chosen by the accelerator (``bf16-mixed`` on GPU, ``32-true`` on CPU), and every
participant with ``dtype: auto`` follows it (see :mod:`fedrefine.participants.precision`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger

from fedrefine.participants import precision as precisions
from fedrefine.settings import SettingsError

#: Where runs go when only ``--run_name`` is given.
RUNS_DIR = "runs"
#: Loggers whose files go under the run root when their ``save_dir`` is left ``.`` (or unset).
SAVE_DIR_LOGGERS = ("WandbLogger", "CSVLogger", "TensorBoardLogger")
#: Callbacks that need a logger (left out of logger-free runs, with a note).
NEEDS_LOGGER = ("LearningRateMonitor",)


def run_config_path(root: str | Path, stage: str) -> Path:
    """Where a stage's resolved config is saved: ``config.yaml`` for fit, ``<stage>_config.yaml`` otherwise."""
    return Path(root) / ("config.yaml" if stage == "fit" else f"{stage}_config.yaml")


def auto_precision(accelerator: Any) -> str:
    """``bf16-mixed`` on a GPU that has bf16 (``16-mixed`` on one without), ``32-true`` on CPU."""
    name = str(getattr(accelerator, "class_path", accelerator) or "auto").lower()
    gpu = torch.cuda.is_available() if name == "auto" else name in ("gpu", "cuda") or "cuda" in name
    return precisions.auto_precision(gpu)


def dtype_for_precision(precision: Any) -> str:
    """The participants' weight dtype under a trainer precision (the frozen LLMs run in the compute dtype)."""
    text = str(precision)
    if text.startswith("bf16"):
        return "bfloat16"
    if text.startswith("16"):
        return "float16"
    return "float32"


def _entries(value: Any):
    """Every ``class_path`` entry (a participant source, a callback, a logger) nested in a config value."""
    if isinstance(value, list):
        for item in value:
            yield from _entries(item)
        return
    if not hasattr(value, "get") or isinstance(value, str):
        return
    if value.get("class_path") is not None:
        yield value
    children = vars(value) if hasattr(value, "__dict__") else value  # a Namespace's keys() are flattened leaves
    for key in list(children.keys() if hasattr(children, "keys") else []):
        if key != "class_path":
            yield from _entries(children.get(key))


def _class_name(entry: Any) -> str:
    return str(entry.get("class_path", "")).rsplit(".", 1)[-1]


def prepare_run(config: Any, subcommand: str, run_name: str | None = None) -> list[str]:
    """Resolve a run's config in place before anything is built: root, precision and dtypes, derived paths,
    logger-free callbacks. Returns notes for the user (what was derived or left out)."""
    trainer, notes = config["trainer"], []
    if run_name:
        trainer["default_root_dir"] = str(Path(RUNS_DIR) / run_name)
    root = Path(trainer.get("default_root_dir") or ".")
    if trainer.get("precision") is None:
        trainer["precision"] = auto_precision(trainer.get("accelerator"))
    dtype = dtype_for_precision(trainer["precision"])
    model = config.get("model")
    for entry in _entries(model):
        init_args = entry.get("init_args")
        if init_args is not None and hasattr(init_args, "get") and init_args.get("dtype") == "auto":
            init_args["dtype"] = dtype
    init_args = model.get("init_args") if model is not None else None
    if init_args is not None and "export_dir" in init_args and init_args.get("export_dir") is None:
        gated = str(model.get("class_path", "")).endswith("FederationModule")
        init_args["export_dir"] = str(root / ("gate" if gated else "fuser"))
    if subcommand != "fit" and init_args is not None and "fuser_path" in init_args and init_args.get("fuser_path") is None:
        exported = Path(init_args.get("export_dir") or root / "fuser")
        if (exported / "fuser.json").is_file():
            init_args["fuser_path"] = str(exported)
            notes.append(f"model.fuser_path: {exported} (this run's exported fuser)")
    callbacks = trainer.get("callbacks") or []
    for entry in _entries(callbacks):
        args = entry.get("init_args")
        if _class_name(entry) == "ModelCheckpoint" and args is not None and args.get("dirpath") is None:
            args["dirpath"] = str(root / "checkpoints")
    logger = trainer.get("logger")
    for entry in _entries(logger):
        args = entry.get("init_args")
        if _class_name(entry) in SAVE_DIR_LOGGERS and args is not None and args.get("save_dir") in (None, "."):
            args["save_dir"] = str(root)
    if logger in (None, False) or logger == []:
        kept = [c for c in callbacks if _class_name(c) not in NEEDS_LOGGER]
        if len(kept) != len(callbacks):
            trainer["callbacks"] = kept
            notes.append(f"trainer.logger is off: left out {', '.join(NEEDS_LOGGER)} (it needs a logger)")
    return notes


def _checkpoint_dirs(trainer: L.Trainer) -> list[Path]:
    return sorted({Path(c.dirpath) for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.dirpath})


class OutputGuard(Callback):
    """Refuses to overwrite an earlier run's outputs (see the module docstring); with ``overwrite`` it clears the
    earlier run's checkpoints, so that ``last.ckpt`` is this run's.

    Args:
        overwrite: replace an earlier run's fuser, checkpoints and results.
    """

    def __init__(self, overwrite: bool = False) -> None:
        self.overwrite = overwrite

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        if stage == "fit" and trainer.ckpt_path is None:
            self._check_fit(trainer, pl_module)
        if stage == "test":
            results = Path(trainer.default_root_dir) / "test_results.json"
            if results.is_file() and not self.overwrite:
                raise SettingsError(
                    f"{results} holds an earlier test's results; pass --overwrite true to replace them, or another "
                    f"--trainer.default_root_dir (or --run_name) for this test."
                )

    def _check_fit(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        export = getattr(pl_module, "export_directory", None)
        exported = export() if export is not None else None
        earlier = []
        if exported is not None and exported.is_dir() and any(exported.glob("*.safetensors")):
            earlier.append(f"a fuser in {exported}")
        checkpoints = [p for d in _checkpoint_dirs(trainer) if d.is_dir() for p in sorted(d.glob("*.ckpt"))]
        if checkpoints:
            earlier.append(f"checkpoints in {checkpoints[0].parent}")
        if not earlier:
            return
        if not self.overwrite:
            resume = f"resume it with --ckpt_path {checkpoints[0].parent / 'last.ckpt'}, " if checkpoints else ""
            raise SettingsError(
                f"An earlier run left {' and '.join(earlier)}; {resume}pass --overwrite true to replace it, or start "
                f"this run elsewhere with --trainer.default_root_dir DIR (or --run_name NAME)."
            )
        for path in checkpoints:  # the earlier run's: last.ckpt will be this run's, not last-v1.ckpt
            path.unlink()


class DropFailedRun(Callback):
    """A command that fails before it trained a step leaves no W&B run behind (its offline run is finished and
    removed); an interrupted ``fit`` keeps its run, as its checkpoint does."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.state.fn == "fit" and trainer.global_step > 0:
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and getattr(logger, "_experiment", None) is not None:
                run = logger.experiment
                directory = Path(run.dir).parent  # .../wandb/offline-run-<time>-<id>
                run.finish(exit_code=1)
                logger._experiment = None
                if directory.name.startswith("offline-run-"):
                    shutil.rmtree(directory, ignore_errors=True)
