"""The gradient of one global training batch, as `tests/test_distributed.py` compares it.

Run as a script under torchrun (`python -m torch.distributed.run ... tests/ddp_gradient.py SPEC.json
OUT.pt`) it computes, on every rank, its share of the batch through DistributedDataParallel, the
way `pixelrec fit` trains; rank 0 saves the all-reduced gradients. `batch_gradient(spec)` is the
same computation in one process.
"""

from __future__ import annotations

import json
import sys

import torch
from torch.nn.parallel import DistributedDataParallel

from pixelrec import distributed
from pixelrec.data.sequences import load_sequences
from pixelrec.recommend.batches import iterate_user_batches, sample_negatives, training_windows
from pixelrec.recommend.build import build_recommender
from pixelrec.recommend.config import FitConfig
from pixelrec.recommend.train import _step_loss


def batch_gradient(spec: dict, world: distributed.World = distributed.World()) -> tuple[float, dict]:
    """(the batch's loss, {parameter: gradient}) of the first global batch of `spec` (a FitConfig as a dict)."""
    torch.manual_seed(0)
    cfg = FitConfig.from_dict(spec).validate()
    data = load_sequences(cfg.interactions)
    model = build_recommender(cfg, data)
    windows = training_windows(data, cfg.model.max_len, cfg.train.windows, cfg.train.stride)
    gen = torch.Generator().manual_seed(1)
    seq, trained, users = next(iter(iterate_user_batches(windows, cfg.train.batch_size, gen)))
    neg = sample_negatives(seq, model.known_items, gen) if cfg.loss.loss == "bpr" else None
    uniform = model.draw_uniform_negatives(gen)
    step = DistributedDataParallel(model, forward_sync_buffers=False) if world.is_distributed else model
    loss = _step_loss(model, step, seq, neg, uniform, trained, torch.device("cpu"), world, users)
    loss.backward()
    value = world.all_reduce_sum(loss.detach()).item() / world.size
    return value, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


if __name__ == "__main__":
    torch.set_num_threads(1)
    world = distributed.init("cpu")
    results = [batch_gradient(spec, world) for spec in json.loads(open(sys.argv[1]).read())]
    if world.is_main:
        torch.save(results, sys.argv[2])
