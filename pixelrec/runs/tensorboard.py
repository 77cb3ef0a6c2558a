"""`pixelrec fit --tensorboard DIR`: every finished epoch's metrics as TensorBoard scalars.

Each epoch's metrics.jsonl row becomes scalars at step = epoch: `train/loss`, `valid/ndcg@10`,
`valid/recall@10` (and @20), `time/train_seconds` and `time/epoch_seconds`, flushed after every
epoch so that a running TensorBoard shows the curve as it grows. It needs the `tensorboard`
package (`pip install 'pixelrec[tensorboard]'`); without it `fit` refuses the option before
training, in one line.
"""

from __future__ import annotations

from typing import Any

from ..errors import PixelrecError

# metrics.jsonl key -> TensorBoard tag (valid_* keys become valid/*)
_TAGS = {"train_loss": "train/loss", "train_seconds": "time/train_seconds", "seconds": "time/epoch_seconds"}


def scalar_tags(row: dict[str, Any]) -> dict[str, float]:
    """The scalars of one metrics.jsonl row, by TensorBoard tag."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or key == "epoch":
            continue
        tag = _TAGS.get(key) or (f"valid/{key[len('valid_'):]}" if key.startswith("valid_") else None)
        if tag is not None:
            out[tag] = float(value)
    return out


class EpochScalars:
    """A callable for `runs.fit.fit(on_epoch=...)` writing each epoch's row under `log_dir`."""

    def __init__(self, log_dir: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise PixelrecError("--tensorboard needs the tensorboard package: pip install 'pixelrec[tensorboard]' "
                                "(or pip install tensorboard)") from None
        self.writer = SummaryWriter(log_dir=log_dir)

    def __call__(self, row: dict[str, Any]) -> None:
        for tag, value in scalar_tags(row).items():
            self.writer.add_scalar(tag, value, global_step=int(row["epoch"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
