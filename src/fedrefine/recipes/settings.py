"""Settings that contradict each other, refused with both named (never silently ignored)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from fedrefine.evaluation import EvaluationConfig
from fedrefine.fuser import Fuser, FuserConfig
from fedrefine.settings import SettingsError


def check_saved_fuser_settings(saved: FuserConfig, given: FuserConfig | None, path: str) -> None:
    """A saved fuser keeps the settings it was trained with: ``model.fuser`` settings that differ are refused."""
    if given is None:
        return
    old, new = asdict(saved), asdict(given)
    differ = [f"model.fuser.{k}={new[k]!r} (saved: {old[k]!r})" for k in new if new[k] != old.get(k)]
    if differ:
        raise SettingsError(
            f"model.fuser_path={path} is a fuser trained with other settings than model.fuser: {', '.join(differ)}. "
            f"A saved fuser keeps its settings; drop those model.fuser overrides, or train a new fuser with them."
        )


def check_last_token_settings(fusers: Sequence[Fuser], evaluation: EvaluationConfig, training_data: Any = None) -> None:
    """``fuse_at: last`` fuses only the last prompt token; without the answer prefix that token is a chat-template
    token no sender reads, so nothing would be fused (0 bytes): refuse that, naming the settings.

    ``training_data``: the data module ``fit`` trains on (its ``response_prefill`` is checked), or None.
    """
    if not any(f.config.mode == "residual" and f.config.fuse_at == "last" for f in fusers):
        return
    missing = [] if evaluation.prefill_answer else ["model.evaluation.prefill_answer=true"]
    if training_data is not None and not getattr(training_data, "response_prefill", None):
        missing.append("data.response_prefill (e.g. 'The correct answer is')")
    if missing:
        raise SettingsError(
            f"model.fuser.fuse_at=last fuses only the last prompt token, which every participant reads only with "
            f"the answer prefix; without it no sender token is aligned there and nothing is fused. Set "
            f"{' and '.join(missing)}, or use model.fuser.fuse_at=prompt."
        )


def check_trained_dtypes(fuser: Fuser, loaded: dict[str, str], path: str) -> None:
    """A fuser used with participants in other dtypes than it was trained with works, but its caches differ
    slightly: warn, naming both (a fuser saved before dtypes were recorded is not checked)."""
    trained = fuser.trained_with
    differ = [f"{key.removesuffix('_dtype')} {loaded[key]} (trained: {trained[key]})"
              for key in loaded if key in trained and trained[key] != loaded[key]]
    if differ:
        warnings.warn(
            f"model.fuser_path={path} was trained with other participant dtypes: {', '.join(differ)}. Its scores "
            f"may differ from those measured in training; load the participants with the dtypes it was trained with "
            f"(dtype: ..., or trainer.precision), or retrain.",
            stacklevel=2,
        )
