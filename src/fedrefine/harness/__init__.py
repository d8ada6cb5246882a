"""lm-evaluation-harness through FedRefine's routes: any lm-eval task answered by the receiver alone, a sender alone,
C2C (gated or not), T2T or the adaptive route.

- :mod:`~fedrefine.harness.contexts`: lm-eval's contexts as FedRefine prompts (the conversation behind a rendering);
- :mod:`~fedrefine.harness.routes`: each route reading a batch of contexts once (and what it refuses);
- :mod:`~fedrefine.harness.loading`: the fused receiver a fit/test config describes;
- :mod:`~fedrefine.harness.model`: the lm-eval model ``fedrefine`` (needs lm-eval: ``pip install -e ".[lm-eval]"``);
- :mod:`~fedrefine.harness.toy_tasks`: the toy world as lm-eval task YAMLs over local files;
- :mod:`~fedrefine.harness.cli`: ``fedrefine eval-harness`` / ``python -m fedrefine.harness``.

Python: ``fedrefine.harness.register()`` then ``lm_eval.simple_evaluate(model="fedrefine", model_args=...)``, or pass
``FedRefineLM(...)`` as ``model``.
"""

from __future__ import annotations

from typing import Any

LM_EVAL_MISSING = "lm-evaluation-harness is not installed: pip install -e \".[lm-eval]\" (lm-eval >= 0.4.13)."


def register() -> Any:
    """Register the ``fedrefine`` model with lm-eval (importing it) and return its class; one line if lm-eval is
    missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ImportError(LM_EVAL_MISSING) from None
    from fedrefine.harness.model import FedRefineLM

    return FedRefineLM
