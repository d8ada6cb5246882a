"""The fusers' optimizer: AdamW with linear warm-up, then linear decay to 0, stepped every optimizer step."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def adamw_with_warmup(
    parameters: Iterable[torch.nn.Parameter], learning_rate: float, weight_decay: float, total_steps: int,
    warmup_fraction: float,
) -> dict:
    """Lightning's ``configure_optimizers`` answer for ``total_steps`` optimizer steps."""
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
    warmup = max(1, int(warmup_fraction * total_steps))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
