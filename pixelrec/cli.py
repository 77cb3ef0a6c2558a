"""The `pixelrec` command line: a thin click layer over the Python API (SPEC §4).

Each command parses its options into the API's dataclasses and calls one function. Bad input
raises PixelrecError, printed here as one line (`error: ...`) with exit status 2.
"""

from __future__ import annotations

import functools
import json
import sys

import click

from . import __version__
from .errors import PixelrecError


def _friendly_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PixelrecError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def _explicit(ctx: click.Context) -> set[str]:
    """Options the user typed (as opposed to defaults), so presets never override them."""
    return {name for name in ctx.params
            if ctx.get_parameter_source(name) not in (click.core.ParameterSource.DEFAULT, None)}


def _ks(value: str) -> tuple[int, ...]:
    try:
        ks = tuple(sorted({int(k) for k in value.split(",") if k.strip()}))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated integers like 5,10,20") from None
    if not ks or min(ks) < 1:
        raise click.BadParameter(f"{value!r}: every k must be a positive integer")
    return ks


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="pixelrec")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or status lines.")
def cli(quiet: bool) -> None:
    """Image-based sequential recommendation with an embedding cache.

    \b
    Stages:  synth -> encode (images -> HDF5 cache) -> fit (sequence recommender)
             -> evaluate / retrieve / index (FAISS).
    Start with `pixelrec demo`.
    """
    import os

    from .runtime import set_quiet

    set_quiet(quiet or os.environ.get("PIXELREC_QUIET", "") not in ("", "0"))


# ----------------------------------------------------------------------------------------- synth
@cli.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--users", type=int, default=5000, show_default=True)
@click.option("--items", type=int, default=2000, show_default=True, help="Catalogue size, cold items included.")
@click.option("--cold-items", type=int, default=100, show_default=True, help="Items that appear only as final (test) targets.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--image-size", type=int, default=64, show_default=True, help="Cover size in pixels.")
@click.option("--styles", type=int, default=12, show_default=True, help="Number of visual styles users choose by.")
@click.option("--min-len", type=int, default=5, show_default=True, help="Fewest interactions per user.")
@click.option("--max-len", type=int, default=40, show_default=True, help="Most interactions per user.")
@click.option("--style-seed", type=int, help="Seed of the styles' look (share it to make datasets with the same styles).")
@click.option("--item-prefix", default="i", show_default=True, help="Item ids are PREFIX + number.")
@click.option("--user-prefix", default="u", show_default=True, help="User ids are PREFIX + number.")
@click.option("--lmdb", is_flag=True, help="Also write covers.lmdb in PixelRec's LMDB format.")
@_friendly_errors
def synth(out_dir, users, items, cold_items, seed, image_size, styles, min_len, max_len, style_seed, item_prefix,
          user_prefix, lmdb):
    """Write a synthetic PixelRec-format dataset: interactions.csv, covers/, items.csv.

    Users choose items by what the covers show (visual styles), with sequential dynamics and a
    long-tailed popularity; the cold items appear only as final (test) interactions.
    """
    from .data.synth import SynthConfig, synthesize

    s = synthesize(out_dir, SynthConfig(users=users, items=items, cold_items=cold_items, seed=seed,
                                        image_size=image_size, styles=styles, min_len=min_len, max_len=max_len,
                                        style_seed=style_seed, item_prefix=item_prefix, user_prefix=user_prefix,
                                        write_lmdb=lmdb))
    click.echo(f"{out_dir}: {s.n_users} users, {s.n_items} items ({s.n_cold} cold), {s.n_interactions} interactions"
               f" (top 10% of items hold {s.top10_share:.0%}) in {s.seconds:.1f}s")


# ---------------------------------------------------------------------------------------- encode
@cli.command()
@click.option("--images", required=True, type=click.Path(), help="Covers dir (<item_id>.jpg|png|jpeg|webp) or PixelRec LMDB.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="HDF5 cache to write (resumed if interrupted).")
@click.option("--interactions", type=click.Path(dir_okay=False), help="Encode only the items of this CSV.")
@click.option("--model", default="ViT-B-32", show_default=True, help="open_clip model name (pixelrec-tiny-vit for tests).")
@click.option("--pretrained", default="none", show_default=True, help="none (seeded random init) | open_clip tag | local checkpoint path.")
@click.option("--pooling", type=click.Choice(["model", "mean"]), default="model", show_default=True,
              help="model: open_clip's pooled output; mean: mean of the last hidden tokens (PixelRec's ViT).")
@click.option("--preset", type=click.Choice(["default", "pixelrec"]), default="default", show_default=True,
              help="pixelrec: squash to the input size, mean = std = 0.5 (the reference code's preprocessing).")
@click.option("--image-size", type=int, help="Override the model's input size.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random-init seed (--pretrained none).")
@click.option("--split-block", type=int, help="Also cache the tokens entering the last K blocks (for --items partial).")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--workers", type=int, help="Decoding processes (default: min(4, cores)).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N]")
@click.option("--float32", is_flag=True, help="Store float32 embeddings (default float16).")
@click.option("--normalize", is_flag=True, help="L2-normalise the embeddings.")
@click.option("--skip-missing", is_flag=True, help="Record items of --interactions without an image as failed instead of stopping.")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache made with other settings.")
@click.option("--no-amp", is_flag=True, help="No mixed precision on CUDA.")
@click.option("--from-run", type=click.Path(file_okay=False),
              help="Encode with a trained run's item tower: the cache then holds the run's item vectors.")
@click.pass_context
@_friendly_errors
def encode(ctx, images, out, interactions, model, pretrained, pooling, preset, image_size, seed, split_block, batch_size,
           workers, device, float32, normalize, skip_missing, overwrite, no_amp, from_run):
    """Encode covers once into an HDF5 embedding cache (resumable: rerun the same command)."""
    from .encode import EncodeConfig, EncoderConfig, encode_images

    encoder = None
    if from_run:
        from .runs.new_items import run_item_encoder

        clash = {"model", "pretrained", "pooling", "preset", "image_size", "seed", "split_block", "normalize"} & _explicit(ctx)
        if clash:
            raise PixelrecError(f"--from-run takes the encoder from the run; drop --{sorted(clash)[0].replace('_', '-')}")
        encoder = run_item_encoder(from_run, "cpu")
    cfg = EncodeConfig(images=images, out=out, interactions=interactions,
                       encoder=EncoderConfig(model=model, pretrained=pretrained, pooling=pooling, preset=preset,
                                             image_size=image_size, seed=seed),
                       batch_size=batch_size, num_workers=workers, device=device, float32=float32,
                       split_block=split_block, normalize=normalize, skip_missing=skip_missing,
                       overwrite=overwrite, amp=not no_amp)
    s = encode_images(cfg, encoder=encoder)
    if s.already_complete:
        click.echo(f"{out}: already complete ({s.n_encoded} items, {s.n_failed} failed); nothing to do")
        return
    click.echo(f"{out}: {s.n_encoded} items encoded, {s.n_failed} failed"
               + (f" (resumed after {s.resumed_from})" if s.resumed_from else "")
               + f", {s.images_per_s:.0f} images/s")
    for item, reason in list(s.failed.items())[:10]:
        click.echo(f"  failed {item}: {reason}", err=True)
    if s.n_failed > 10:
        click.echo(f"  ... and {s.n_failed - 10} more (listed in the cache's failed_item_ids)", err=True)


# ------------------------------------------------------------------------------------------- fit
# (click option name, "section.field" in FitConfig)
FIT_OPTIONS = {
    "items": "items.kind", "cache": "items.cache", "images": "items.images", "encoder": "items.encoder",
    "pretrained": "items.pretrained", "image_size": "items.image_size", "tune_blocks": "items.tune_blocks", "adapter": "items.adapter",
    "head": "items.head", "item_dropout": "items.dropout", "hybrid": "items.hybrid", "image_branch": "items.image_branch",
    "grad_checkpointing": "items.grad_checkpointing", "cache_in_memory": "items.cache_in_memory",
    "model": "model.model", "max_len": "model.max_len", "dim": "model.dim", "layers": "model.layers",
    "heads": "model.heads", "dropout": "model.dropout", "positions": "model.positions",
    "loss": "loss.loss", "negatives": "loss.negatives",
    "epochs": "train.epochs", "batch_size": "train.batch_size", "lr": "train.lr",
    "weight_decay": "train.weight_decay", "encoder_lr": "train.encoder_lr",
    "encoder_weight_decay": "train.encoder_weight_decay", "patience": "train.patience",
    "windows": "train.windows", "stride": "train.stride", "seed": "train.seed", "deterministic": "train.deterministic",
    "device": "train.device", "min_interactions": "train.min_interactions",
}


@cli.command()
@click.option("--interactions", required=True, type=click.Path(dir_okay=False), help="Interaction CSV (item_id,user_id,timestamp).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory to write.")
@click.option("--items", type=click.Choice(["id", "frozen", "partial", "e2e", "hybrid"]), default="id", show_default=True,
              help="Item tower: id (IDNet), frozen (cached embedding + adapter), partial (cached split-block tokens "
                   "+ top encoder blocks), e2e (raw images, PixelNet), hybrid (id + image).")
@click.option("--cache", type=click.Path(dir_okay=False), help="HDF5 cache from `pixelrec encode` (frozen/partial/hybrid).")
@click.option("--images", type=click.Path(), help="Covers dir or LMDB (e2e).")
@click.option("--encoder", default="ViT-B-32", show_default=True, help="open_clip model (e2e).")
@click.option("--pretrained", default="none", show_default=True, help="none | open_clip tag | local checkpoint path (e2e).")
@click.option("--image-size", type=int, help="e2e: encoder input size in pixels (default: the model's own; "
                                              "use the cache's size to compare with frozen/partial).")
@click.option("--tune-blocks", type=int, default=-1, show_default=True, help="e2e: train only the top K encoder blocks (-1 = all).")
@click.option("--adapter", type=click.Choice(["auto", "linear", "mlp"]), default="auto", show_default=True,
              help="Image embedding -> recommender dim (auto: mlp for frozen, linear after trainable blocks).")
@click.option("--head", type=click.Choice(["pooled", "token_relu_mean"]), default="pooled", show_default=True,
              help="partial/e2e pooling head: the encoder's pooled output, or PixelRec's mean over tokens of ReLU(Linear(h)).")
@click.option("--item-dropout", type=float, default=0.0, show_default=True,
              help="Image towers: dropout on the image features before the adapter/head (helps cold items).")
@click.option("--hybrid", type=click.Choice(["sum", "concat"]), default="sum", show_default=True, help="hybrid: how id and image vectors combine.")
@click.option("--image-branch", type=click.Choice(["frozen", "partial"]), default="frozen", show_default=True, help="hybrid: image tower kind.")
@click.option("--grad-checkpointing", is_flag=True, help="e2e: trade compute for memory.")
@click.option("--cache-in-memory", type=click.Choice(["auto", "yes", "no"]), default="auto", show_default=True,
              help="Load the cache into RAM (auto: when it is small).")
@click.option("--model", type=click.Choice(["sasrec", "gru4rec"]), default="sasrec", show_default=True)
@click.option("--max-len", type=int, default=20, show_default=True, help="Items of history the model sees.")
@click.option("--dim", type=int, default=64, show_default=True)
@click.option("--layers", type=int, default=None, help="Transformer blocks / GRU layers.  [default: 2 for sasrec, 1 for gru4rec]")
@click.option("--heads", type=int, default=2, show_default=True)
@click.option("--dropout", type=float, default=0.3, show_default=True)
@click.option("--positions", type=click.Choice(["relative", "absolute"]), default="relative", show_default=True,
              help="SASRec positions: relative (attention bias by distance, trains every position as it is served) "
                   "or absolute (learned embeddings, original SASRec / PixelRec).")
@click.option("--loss", type=click.Choice(["softmax", "bpr"]), default="softmax", show_default=True)
@click.option("--negatives", type=int, default=0, show_default=True,
              help="Sampled softmax: uniform negatives per batch (0 = full softmax when affordable, else 1024).")
@click.option("--epochs", type=int, default=200, show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--lr", type=float, default=None, help="Learning rate.  [default: 1e-3 for sasrec, 2e-3 for gru4rec]")
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--encoder-lr", type=float, default=1e-4, show_default=True, help="Learning rate of image-encoder blocks.")
@click.option("--encoder-weight-decay", type=float, default=0.0, show_default=True)
@click.option("--patience", type=int, default=10, show_default=True, help="Early stop after this many epochs without a better valid NDCG@10.")
@click.option("--windows", type=click.Choice(["sliding", "overlapping", "chunks"]), default=None,
              help="How training sequences are cut: sliding (each target once, in the window where it has the most "
                   "context), overlapping (every target of every window), chunks (PixelRec's non-overlapping chunks).  "
                   "[default: sliding for sasrec, overlapping for gru4rec]")
@click.option("--stride", type=int, default=0, show_default=True,
              help="Sliding windows: a window ends every STRIDE items and trains its newest STRIDE targets "
                   "(1 = one sample per prefix, as RecBole). 0 = auto: max-len/6 for id/frozen, max-len/2 for "
                   "towers that run image blocks and for overlapping windows.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--deterministic", is_flag=True, help="Ask torch for deterministic kernels.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N]")
@click.option("--min-interactions", type=int, default=3, show_default=True, help="Users with fewer are dropped (counted).")
@click.option("--preset", type=click.Choice(["default", "pixelrec"]), default="default", show_default=True,
              help="pixelrec = the reference code's settings (SPEC §6); options you give still win.")
@click.option("--init-from", type=click.Path(file_okay=False), help="Transfer: start from a trained run's sequence encoder and image tower.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last finished epoch.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run in --out.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
@_friendly_errors
def fit(ctx: click.Context, interactions, out, preset, init_from, resume, overwrite, as_json, **opts):
    """Train a sequence recommender; early-stops on validation NDCG@10 and writes RUN_DIR."""
    from .recommend.config import FitConfig, apply_preset
    from .runs.fit import fit as run_fit

    cfg = FitConfig(interactions=interactions, out=out, init_from=init_from)
    for name, value in opts.items():
        section, field = FIT_OPTIONS[name].split(".")
        setattr(getattr(cfg, section), field, value)
    explicit = {FIT_OPTIONS[n] for n in _explicit(ctx) if n in FIT_OPTIONS}
    apply_preset(cfg, preset, explicit)
    result = run_fit(cfg, resume=resume, overwrite=overwrite)
    summary = {"run_dir": str(result.run_dir), "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
               "seconds": round(result.seconds, 1), "seconds_per_epoch": round(result.seconds_per_epoch, 2),
               "valid": result.valid, "test": result.test["overall"]}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        t = result.test["overall"]
        click.echo(f"{result.run_dir}: best epoch {result.best_epoch} of {result.epochs_run}, "
                   f"test NDCG@10 {t['ndcg@10']:.4f} Recall@10 {t['recall@10']:.4f} "
                   f"({result.seconds:.0f}s, {result.seconds_per_epoch:.1f}s/epoch)")


# -------------------------------------------------------------------------------------- evaluate
@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--split", type=click.Choice(["test", "valid"]), default="test", show_default=True)
@click.option("--k", "ks", default="5,10,20", show_default=True, help="Cut-offs, comma-separated.")
@click.option("--index", "index_spec", default=None, help="Evaluate through this FAISS index (e.g. IVF256,Flat, HNSW32) and report its recall against exact search.")
@click.option("--nprobe", type=int, help="IVF: lists probed per query.")
@click.option("--ef-search", type=int, help="HNSW: efSearch.")
@click.option("--negatives", type=int, default=0, show_default=True, help="Sampled protocol: N random non-interacted negatives per user (0 = full ranking).")
@click.option("--cold-threshold", type=int, default=1, show_default=True, help="Targets with fewer training interactions count as cold.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampled protocol.")
@click.option("--device", default="cpu", show_default=True, help="Where users are encoded and FAISS searches (cuda needs pixelrec[gpu]).")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
@_friendly_errors
def evaluate(run_dir, split, ks, index_spec, nprobe, ef_search, negatives, cold_threshold, seed, device, as_json):
    """Recall@k / NDCG@k of a trained run (full ranking, history excluded; SPEC §7)."""
    from .runs.evaluate import evaluate_run
    from .index.report import format_report

    options = {k: v for k, v in (("nprobe", nprobe), ("ef_search", ef_search)) if v is not None}
    if options and not index_spec:
        raise PixelrecError("--nprobe/--ef-search apply to an approximate index: add --index SPEC (e.g. IVF256,Flat)")
    report = evaluate_run(run_dir, split=split, ks=_ks(ks), index_spec=index_spec, index_options=options,
                          negatives=negatives, cold_threshold=cold_threshold, seed=seed, device=device)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


# -------------------------------------------------------------------------------------- retrieve
@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--user", help="A user id of the run's data: their full history is the query.")
@click.option("--history", help="Comma-separated item ids, oldest first.")
@click.option("--users", "users_file", type=click.Path(dir_okay=False),
              help="File with one user id per line ('-' = stdin, 'all' = every user); streams JSONL.")
@click.option("--k", type=int, default=10, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), help="With --users: write the JSONL here (atomically) instead of stdout.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="JSON output (single queries).")
@_friendly_errors
def retrieve(run_dir, user, history, users_file, k, out, device, as_json):
    """Top-k items for a user, an ad-hoc history, or a file of users (history excluded)."""
    from .runs.retrieve import retrieve_batch, retrieve_one

    given = [x for x in (user, history, users_file) if x is not None]
    if len(given) != 1:
        raise PixelrecError("give exactly one of --user, --history or --users")
    if users_file is not None:
        summary = retrieve_batch(run_dir, users_file, k=k, out=out, device=device)
        click.echo(f"retrieved for {summary['served']} users"
                   + (f"; {len(summary['unknown'])} unknown user ids: {', '.join(summary['unknown'][:5])}"
                      + ("..." if len(summary["unknown"]) > 5 else "") if summary["unknown"] else "")
                   + (f"; wrote {out}" if out else ""), err=True)
        return
    result = retrieve_one(run_dir, user=user, history=history.split(",") if history else None, k=k, device=device)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        who = f"user {result['user_id']}" if result.get("user_id") else "history"
        click.echo(f"top {k} for {who} ({len(result['history'])} items of history excluded):")
        for rank, (item, score) in enumerate(zip(result["items"], result["scores"]), 1):
            click.echo(f"{rank:>4}  {item}  {score:.4f}")


# ----------------------------------------------------------------------------------------- index
@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--spec", default="Flat", show_default=True, help="FAISS index-factory string: Flat, IVF1024,Flat, IVF1024,PQ16, HNSW32, OPQ16,IVF1024,PQ16 ...")
@click.option("--metric", type=click.Choice(["ip", "cosine"]), default="ip", show_default=True, help="The model scores by inner product.")
@click.option("--nprobe", type=int, help="IVF: lists probed per query (stored with the index).")
@click.option("--ef-search", type=int, help="HNSW: efSearch (stored with the index).")
@click.option("--add-images", type=click.Path(), help="Encode these new covers through the run's trained tower and add them.")
@click.option("--device", default="cpu", show_default=True)
@_friendly_errors
def index(run_dir, spec, metric, nprobe, ef_search, add_images, device):
    """(Re)build the run's item index, or add new items from their cover images."""
    from .runs.item_index import add_images_to_run, rebuild_run_index

    if add_images:
        summary = add_images_to_run(run_dir, add_images, device=device)
        ids = f" (ids {summary['first_id']}..{summary['last_id']})" if summary["added"] else ""
        click.echo(f"added {summary['added']} items to {run_dir}/index{ids}"
                   + (f"; {summary['skipped']} already indexed" if summary.get("skipped") else "")
                   + (f"; {len(summary['failed'])} images failed" if summary.get("failed") else ""))
        return
    idx = rebuild_run_index(run_dir, spec=spec, metric=metric, nprobe=nprobe, ef_search=ef_search, device=device)
    click.echo(f"{run_dir}/index: {idx.describe()}")


# ------------------------------------------------------------------------------------------ demo
@cli.command()
@click.option("--workdir", default="pixelrec-demo", show_default=True, type=click.Path(file_okay=False),
              help="Where the data, cache, runs and plot go.")
@click.option("--towers", default="id,frozen,partial,e2e", show_default=True, help="Item towers to compare.")
@click.option("--epochs", type=int, default=30, show_default=True, help="Most epochs per tower (early stopping, patience 5).")
@click.option("--users", type=int, default=2000, show_default=True)
@click.option("--items", type=int, default=400, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@_friendly_errors
def demo(workdir, towers, epochs, users, items, seed, device):
    """The embedded default: synth -> encode -> fit id/frozen/partial/e2e -> compare -> retrieve."""
    from .demo import DemoConfig, run_demo

    kinds = tuple(t.strip() for t in towers.split(",") if t.strip())
    unknown = [t for t in kinds if t not in ("id", "frozen", "partial", "e2e", "hybrid")]
    if unknown or not kinds:
        raise PixelrecError(f"--towers: unknown tower(s) {', '.join(unknown) or '(none given)'}; "
                            f"choose from id, frozen, partial, e2e, hybrid")
    r = run_demo(DemoConfig(workdir=workdir, towers=kinds, epochs=epochs, users=users, items=items,
                            cold_items=max(1, items // 10), seed=seed, device=device))
    click.echo("\nTest split, full ranking with history excluded (SPEC §7):")
    click.echo(r.table)
    click.echo(f"\nplot: {r.plot}")
    ret = r.retrieval
    click.echo(f"\npixelrec retrieve {ret['run_dir']} --user {ret['user_id']} --k 5")
    click.echo(f"  history ({len(ret['history'])} items): {', '.join(ret['history'][-8:])}")
    for rank, (item, score) in enumerate(zip(ret["items"], ret["scores"]), 1):
        click.echo(f"  {rank}. {item}  {score:.4f}")
    click.echo(f"\ndone in {r.seconds:.0f}s; runs are in {workdir}/ (try `pixelrec evaluate {workdir}/run_partial`)")


def main() -> None:
    cli(prog_name="pixelrec")


if __name__ == "__main__":
    main()
