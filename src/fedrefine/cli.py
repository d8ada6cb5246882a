"""The console scripts: ``fedrefine`` (fit / validate / test / predict, bench, kv-bytes) and ``fedrefine-toy``."""

from __future__ import annotations

import argparse
import inspect
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml
from lightning.pytorch.utilities.exceptions import SIGTERMException

from fedrefine.bench.results_file import ResultsFileError, StaleResultsError
from fedrefine.data.conversations import TrainingDataError
from fedrefine.data.loading import DataFileError
from fedrefine.fuser import FuserFileError, FuserPairMismatchError
from fedrefine.fuser.registry import MissingFuserError
from fedrefine.participants import ParticipantLoadError
from fedrefine.recipes.trainer_cli import build_cli
from fedrefine.runtime.heap import keep_large_blocks
from fedrefine.runtime.registry_client import RegistryDownloadError
from fedrefine.runtime.security import SecurityConfigError
from fedrefine.settings import SettingsError
from fedrefine.tasks.multiple_choice import DatasetSchemaError
from fedrefine.tasks.routes import RouteError

#: Errors that name a user mistake and its fix: shown without a traceback.
USER_ERRORS = (
    ParticipantLoadError, DatasetSchemaError, FuserPairMismatchError, FuserFileError, MissingFuserError, RouteError,
    TrainingDataError, DataFileError, SettingsError, StaleResultsError, ConnectionError, FileNotFoundError,
    RegistryDownloadError, SecurityConfigError, ResultsFileError,
)
#: The exit status of a command stopped with Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED = 130


@contextmanager
def user_errors_exit(prog: str) -> Iterator[None]:
    """Show a user mistake (see :func:`user_error`) as one ``<prog>: error:`` line and exit 2; re-raise anything else."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - a user mistake is shown alone, anything else re-raised as it is
        cause = user_error(err)
        if cause is None:
            raise
        print(f"{prog}: error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None


def user_error(err: BaseException) -> BaseException | None:
    """The user mistake behind ``err``: itself, or one that jsonargparse wrapped while building a class from the
    config (its own message then is a dump of the whole config around the one line that matters)."""
    seen = 0
    while err is not None and seen < 20:
        if isinstance(err, USER_ERRORS):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def bench_parser():
    """The ``fedrefine bench`` argument parser: a sweep's YAML names :class:`BenchSweep`'s arguments."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from fedrefine.bench.runner import BenchSweep

    parser = ArgumentParser(prog="fedrefine bench", description=BenchSweep.__doc__.splitlines()[0])
    parser.add_argument("--config", action=ActionConfigFile, help="the sweep's YAML (e.g. benchmarks/fig3_toy.yaml)")
    parser.add_argument("--fresh", action="store_true", help="start over: move an earlier run's results aside (never deleted)")
    parser.add_argument(
        "--rerun", type=list[str], default=[],
        help="cells to run again although finished, by key or shell pattern (e.g. '[\"*@private\"]'): after a fix "
             "that no setting records",
    )
    parser.add_class_arguments(BenchSweep)
    return parser


def load_sweep(args: list[str]):
    """Parse ``fedrefine bench`` arguments into a :class:`BenchSweep` (nothing is loaded yet) and the arguments of
    its :meth:`~fedrefine.bench.runner.BenchSweep.run` (``fresh``, ``rerun``)."""
    from fedrefine.bench.runner import BenchSweep

    parser = bench_parser()
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in jsonargparse 4.49
    config = instantiate(parser.parse_args(args))
    sweep = BenchSweep(**{name: config[name] for name in inspect.signature(BenchSweep).parameters})
    return sweep, {"fresh": config.fresh, "rerun": config.rerun}


def bench_main(argv: list[str] | None = None) -> None:
    """``fedrefine bench --config SWEEP.yaml [--fresh] [--rerun CELLS]``: run (or resume) a benchmark sweep."""
    sweep, run_args = load_sweep(sys.argv[2:] if argv is None else argv)
    sweep.run(**run_args)


#: Every ``fedrefine`` subcommand and what it does (the overview of ``fedrefine --help``).
SUBCOMMANDS = {
    "fit": "train fusers (or a gate) on chat data; writes checkpoints and the exported fuser",
    "validate": "evaluate the validation routes on the validation split",
    "test": "evaluate the test routes (receiver, sender, C2C, T2T, controls) on the test split",
    "predict": "answer free-text prompts with C2C",
    "bench": "run or resume a benchmark sweep (routes x query modes x sender subsets) with tables and plots",
    "kv-bytes": "bytes per prompt token each sender transmits, from model configs (no weights)",
    "eval-harness": "any lm-evaluation-harness task through any route (lm-eval's own arguments; extra lm-eval)",
    "import-c2c": "import a C2C reference checkpoint folder (thu-nics/C2C) as a FedRefine fuser",
    "serve": "run a participant (`serve participant`) or the fuser registry (`serve registry`) as a gRPC service",
}


def overview() -> str:
    lines = ["usage: fedrefine <subcommand> [options]   (fedrefine <subcommand> --help for its options)", "",
             "subcommands:"]
    lines += [f"  {name:<12} {text}" for name, text in SUBCOMMANDS.items()]
    lines += ["", "fedrefine-toy runs the offline toy-world job (fit, then test with controls)."]
    return "\n".join(lines)


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else None
    if command in (None, "-h", "--help"):
        print(overview())
        raise SystemExit(0 if command else 2)
    keep_large_blocks()  # see fedrefine.runtime.heap: large activations are reused, not page-faulted in afresh
    try:
        with user_errors_exit("fedrefine"):
            if command == "bench":
                return bench_main()
            if command == "kv-bytes":
                from fedrefine.bench.kv_bytes import main as kv_bytes_main

                return kv_bytes_main(sys.argv[2:])
            if command == "eval-harness":
                from fedrefine.harness.cli import main as harness_main

                return harness_main(sys.argv[2:])
            if command == "import-c2c":
                from fedrefine.fuser.c2c_import import main as import_c2c_main

                return import_c2c_main(sys.argv[2:])
            if command == "serve":
                from fedrefine.runtime.serve_cli import main as serve_main

                return serve_main(sys.argv[2:])
            if any(arg.startswith("-h") or "help" in arg for arg in sys.argv[2:]):
                import fedrefine.runtime.participant_client  # noqa: F401 -- RemoteParticipant among the classes --help lists
            build_cli()
    except SIGTERMException:  # Lightning stops a SIGTERM'd fit as a plain SystemExit (status 0): say it was killed
        raise SystemExit(128 + signal.SIGTERM) from None
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback (a sweep resumes from its results file)
        print(f"fedrefine {command}: interrupted", file=sys.stderr)
        raise SystemExit(INTERRUPTED) from None


def toy_main(argv: list[str] | None = None) -> None:
    """``fedrefine-toy``: the README's main job, offline on CPU.

    Builds (or reuses) the toy world's pretrained participants, trains the receiver's fuser for
    one sender with ``fedrefine fit``, then runs ``fedrefine test`` on the held-out entities with
    the controls, and prints the table. Extra arguments are passed to both as overrides.
    """
    keep_large_blocks()
    parser = argparse.ArgumentParser(prog="fedrefine-toy", description=toy_main.__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/toyworld.yaml", help="toy-world config (from the repo root)")
    args, overrides = parser.parse_known_args(argv)
    if not Path(args.config).is_file():
        raise SystemExit(f"fedrefine-toy: error: {args.config} not found; run from the repository root or pass --config.")
    config = yaml.safe_load(Path(args.config).read_text())
    given = dict(zip(overrides, overrides[1:]))
    root = Path(given.get("--trainer.default_root_dir", config["trainer"].get("default_root_dir") or "."))
    if "--run_name" in given:  # the run's root is runs/<name> (fedrefine.recipes.run_dir)
        root = Path("runs") / given["--run_name"]
    fuser_dir = given.get("--model.export_dir", config["model"]["init_args"].get("export_dir") or str(root / "fuser"))
    with user_errors_exit("fedrefine-toy"):
        build_cli(["fit", "--config", args.config, *overrides])
        build_cli(["test", "--config", args.config, "--model.fuser_path", fuser_dir, *overrides])


if __name__ == "__main__":
    main()
