"""The progress bar of step-bounded runs: Lightning's rich bar reads "Epoch 3/-2" when ``max_steps`` bounds
training (``max_epochs`` is then -1); this one reads "Epoch 3" and keeps everything else."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class StepRichProgressBar(RichProgressBar):
    """:class:`~lightning.pytorch.callbacks.RichProgressBar` without the meaningless "/-2" of step-bounded runs."""

    def _get_train_description(self, current_epoch: int) -> str:  # overrides a private hook of the rich bar
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"
