"""A callback for subprocess tests: records the responses each rank trained on to ``<dir>/rank<N>.json``."""

import json
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class RecordTrainedResponses(Callback):
    def __init__(self, directory: str) -> None:
        self.directory, self.seen = Path(directory), []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        ids = [row[mask.bool()].tolist() for row, mask in zip(batch.response_ids, batch.response_mask)]
        self.seen.extend(pl_module.fused.receiver.tokenizer.batch_decode(ids))

    def on_train_end(self, trainer, pl_module):
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.seen))
