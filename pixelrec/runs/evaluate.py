"""`pixelrec evaluate`: metrics of a finished run from its stored item vectors (no re-encoding)."""

from __future__ import annotations

from typing import Any

from .. import distributed
from ..index.evaluate import evaluate_model
from ..errors import PixelrecError
from .trained import load_trained
from .visrank import VisRankRun, is_visrank_run


def evaluate_run(run_dir: str, split: str = "test", ks=(5, 10, 20), index_spec: str | None = None,
                 index_options: dict | None = None, negatives: int = 0, cold_threshold: int = 1,
                 seed: int = 0, device: str = "cpu", batch_size: int = 1024,
                 gpu_layout: str = "shard") -> dict[str, Any]:
    """`pixelrec evaluate`: metrics of a finished run from its stored item vectors (no re-encoding).

    Under torchrun the users are shared among the ranks and every rank returns the whole report."""
    if is_visrank_run(run_dir):  # no item vectors: ranked exactly by brute force (runs/visrank.py)
        if index_spec or negatives:
            raise PixelrecError(f"{run_dir}: a --model visrank run is ranked exactly over the whole catalogue; "
                                f"drop --index-spec / --negatives")
        return VisRankRun(run_dir).evaluate(split, ks, cold_threshold)
    world = distributed.init(device)
    trained = world.agree(lambda: load_trained(run_dir, device=world.device(device)))
    table = trained.table[: trained.data.num_items + 1]  # the run's own catalogue (not items added later)
    report = evaluate_model(trained.model, trained.data, split, ks=ks, batch_size=batch_size,
                            cold_threshold=cold_threshold, tower_kind=trained.cfg.items.kind,
                            index_spec=index_spec, index_options=index_options, negatives=negatives,
                            seed=seed, table=table, device=device, world=world, gpu_layout=gpu_layout)
    report["run"] = {"dir": str(run_dir), "items": trained.cfg.items.kind, "model": trained.cfg.model.model,
                     "preset": trained.cfg.preset, "loss": trained.cfg.loss.loss,
                     "encoder_random_init": trained.run.read_config().get("encoder_random_init")}
    return report
