"""LightningCLI for FedRefine's LightningModules and data modules: ``fit`` / ``validate`` / ``test`` / ``predict``.

Used by the ``fedrefine`` console script and by anything that runs those subcommands in-process
(``fedrefine bench`` training a missing fuser, the benchmark scripts).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from rich.console import Console

from fedrefine.data.datamodule import C2CDataModule
from fedrefine.recipes import FusionModule
from fedrefine.recipes.callbacks import InterruptCheckpoint, PrecisionPolicy
from fedrefine.recipes.run_dir import DropFailedRun, OutputGuard, prepare_run, run_config_path


class LogConfigCallback(SaveConfigCallback):
    """Saves the resolved config in the run's root (``config.yaml`` for fit, ``<stage>_config.yaml`` for the others,
    so fit's is never rewritten and can be passed back to ``test``/``predict``) and hands it to W&B."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        if trainer.is_global_zero:
            path = run_config_path(trainer.default_root_dir, getattr(stage, "value", stage))
            path.parent.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, str(path), skip_unset=False, overwrite=True, multifile=False)
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if isinstance(trainer.logger, WandbLogger):
            config = self.parser.dump(self.config, skip_none=False, format="json")
            trainer.logger.experiment.config.update({"fedrefine_config": config}, allow_val_change=True)


class FedRefineCLI(LightningCLI):
    """LightningCLI with one output root per run (:mod:`fedrefine.recipes.run_dir`), ``--overwrite`` and
    ``--run_name``, W&B run names derived from the pair when none is given, and one results table."""

    #: ``validate`` / ``test`` print FedRefine's own results table; Lightning's metric table, which repeats it,
    #: is printed only when ``--verbose`` is given (set by :func:`build_cli`).
    lightning_table = False

    def before_validate(self) -> None:
        self.config_init[self.subcommand]["verbose"] &= self.lightning_table

    before_test = before_validate

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="replace an earlier run's fuser, checkpoints or test results in the run's root")
        parser.add_argument("--run_name", type=str | None, default=None,
                            help="write everything under runs/<run_name> (sets trainer.default_root_dir)")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config)
        run_name = config.get("run_name")
        for note in prepare_run(config, self.subcommand, run_name):
            Console(stderr=True).print(f"[dim]{note}[/]")
        config["run_name"] = None  # now in trainer.default_root_dir: a saved config passed back may move the root
        callbacks = self.trainer_defaults.setdefault("callbacks", [])
        callbacks += [OutputGuard(bool(config.get("overwrite"))), DropFailedRun(), PrecisionPolicy()]
        logger = config.get("trainer", {}).get("logger")
        for entry in logger if isinstance(logger, list) else [logger]:
            if not hasattr(entry, "get") or not str(entry.get("class_path", "")).endswith("WandbLogger"):
                continue
            init_args = entry.get("init_args")
            if init_args is not None and not init_args.get("name"):
                name = run_name or _run_name(config["model"])
                init_args["name"] = f"{self.subcommand}:{name}"


def _run_name(model_config) -> str:
    """``sender->receiver`` (or the module's class) from the model config, for W&B run names."""
    args = model_config.get("init_args", {})
    names = [_short(args[role]) for role in ("sender", "receiver") if role in args]
    if len(names) == 2:
        return "->".join(names)
    return str(model_config.get("class_path", "run")).rsplit(".", 1)[-1]


def _short(source) -> str:
    args = source.get("init_args", {}) if hasattr(source, "get") else {}
    for key in ("name", "name_or_path", "hub_id", "role"):
        if args.get(key):
            return str(args[key]).rsplit("/", 1)[-1]
    spec = args.get("spec")
    return str(spec.get("name")) if hasattr(spec, "get") else "participant"


class _DropAdvertisements(logging.Filter):
    """Lightning's "Tip: try installing litlogger / litmodels" lines, printed on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "💡 Tip:" not in record.getMessage()


def quiet_lightning() -> None:
    """Keep runs' output to what matters: no product tips, no deprecation Lightning itself triggers in torch."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropAdvertisements) for f in logger.filters):
            logger.addFilter(_DropAdvertisements())
    # lightning/pytorch/utilities/_pytree.py calls the deprecated torch LeafSpec check on every batch.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def build_cli(args: list[str] | None = None, run: bool = True) -> FedRefineCLI:
    """Build (and by default run) the CLI; ``args`` default to ``sys.argv[1:]``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_lightning()
    FedRefineCLI.lightning_table = any(a.startswith("--verbose") for a in (sys.argv[1:] if args is None else args))
    return FedRefineCLI(
        FusionModule,
        C2CDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=LogConfigCallback,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        seed_everything_default=0,
        trainer_defaults={"callbacks": [InterruptCheckpoint()]},  # always on: Ctrl-C / SIGTERM save last.ckpt
        args=args,
        run=run,
    )
