"""The `pixelrec` command line: a thin click layer over the Python API.

Each command parses its options into the API's dataclasses and calls one function. The error
boundary every command runs in (one line `error: ...` and exit status 2 for bad input, never a
traceback) and the click classes it needs are in `cli_boundary.py`.

`fit`'s options are generated from the fields of `FitConfig` (recommend/config.py), where each
default, choice list and help text is written once.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable

import click

from . import __version__
from .cli_boundary import PixelrecGroup, process_rank, quiet_given, rank_zero_only
from .errors import PixelrecError
from .recommend.config import ITEM_KINDS, PRECISIONS, SEED_MAX, FitOption, fit_options

GPU_LAYOUTS = ("shard", "replicate")  # = pixelrec.index.faiss_factory.GPU_LAYOUTS (importing FAISS here is slow)

_SEED = click.IntRange(0, SEED_MAX)


def _explicit(ctx: click.Context) -> set[str]:
    """Options the user typed (as opposed to defaults), so presets never override them."""
    return {name for name in ctx.params
            if ctx.get_parameter_source(name) not in (click.core.ParameterSource.DEFAULT, None)
            and name not in _OLD_NAMES}


# Hidden options kept for one release under their old names:
# parameter name -> (old flag, the new option's parameter name, new flag).
_OLD_NAMES = {"old_model": ("--model", "encoder", "--encoder"), "old_index": ("--index", "index_spec", "--spec")}


def _renamed(ctx: click.Context, old: str) -> Any:
    """The value of the option whose old name is the hidden option `old` (a note on stderr when used)."""
    old_flag, new, new_flag = _OLD_NAMES[old]
    if ctx.params[old] is None:
        return ctx.params[new]
    if new in _explicit(ctx):
        raise PixelrecError(f"{old_flag} is the old name of {new_flag}: give only {new_flag}")
    if process_rank() == 0:
        click.echo(f"note: `{ctx.info_name} {old_flag}` is now `{ctx.info_name} {new_flag}`; {old_flag} will be "
                   f"removed in the next release", err=True)
    ctx.params[new] = ctx.params[old]
    ctx.set_parameter_source(new, click.core.ParameterSource.COMMANDLINE)
    return ctx.params[new]


def _ks(value: str) -> tuple[int, ...]:
    try:
        ks = tuple(sorted({int(k) for k in value.split(",") if k.strip()}))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated integers like 5,10,20") from None
    if not ks or min(ks) < 1:
        raise click.BadParameter(f"{value!r}: every k must be a positive integer")
    return ks


@click.group(cls=PixelrecGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="pixelrec")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or status lines.")
def cli(quiet: bool) -> None:
    """Image-based sequential recommendation with an embedding cache.

    \b
    Stages:  synth -> encode (images -> HDF5 cache) -> fit (sequence recommender)
             -> evaluate / retrieve / index (FAISS); `compare` puts runs side by side.
    Start with `pixelrec demo`.
    """
    from .runtime import set_quiet

    set_quiet(quiet or process_rank() > 0 or os.environ.get("PIXELREC_QUIET", "") not in ("", "0"))
    if process_rank() > 0:  # under torchrun, rank 0 alone prints summaries; the others only report failures
        sys.stdout = open(os.devnull, "w")


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
@rank_zero_only
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
@click.option("--images", type=click.Path(), help="Covers dir (<item_id>.jpg|png|jpeg|webp) or PixelRec LMDB.  [required]")
@click.option("--out", type=click.Path(dir_okay=False), help="HDF5 cache to write (resumed if interrupted).  [required]")
@click.option("--interactions", type=click.Path(dir_okay=False), help="Encode only the items of this CSV.")
@click.option("--encoder", default="ViT-B-32", show_default=True,
              help="Image encoder: open_clip model name (pixelrec-tiny-vit for tests).")
@click.option("--model", "old_model", hidden=True, help="Old name of --encoder (kept for one release).")
@click.option("--pretrained", default="none", show_default=True, help="none (seeded random init) | open_clip tag | local checkpoint path.")
@click.option("--pooling", type=click.Choice(["model", "mean"]), default="model", show_default=True,
              help="model: open_clip's pooled output; mean: mean of the last hidden tokens (PixelRec's ViT).")
@click.option("--preset", type=click.Choice(["default", "pixelrec"]), default="default", show_default=True,
              help="pixelrec: the reference code's encoder: squash to the input size, mean = std = 0.5, and (unless "
                   "given) --encoder ViT-B-32-quickgelu --pooling mean --split-block 2 --float32 --precision fp32; "
                   "prints the list it applies.")
@click.option("--image-size", type=int, help="Override the model's input size.")
@click.option("--seed", type=_SEED, default=0, show_default=True, help="Random-init seed (--pretrained none).")
@click.option("--split-block", type=click.IntRange(min=1),
              help="Also cache the tokens entering the last K blocks (for --items partial).")
@click.option("--hidden", type=click.Choice(["cls", "cls+mean"]),
              help="Also cache per-layer states from the same pass (for --items side): each tapped layer's class "
                   "token (cls+mean: and the mean of its patch tokens); ResNet / Swin / ConvNeXt: each stage's "
                   "output pooled over positions (cls).")
@click.option("--taps", default="all", show_default=True,
              help="With --hidden: the layers to cache: all, even (the even ones and the last) or a list such as "
                   "0,6,12 (ViT tap t: after block t, 0: before the first; others: stage t, 0: the stem).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), help="Decoding processes (default: min(4, cores)).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N]")
@click.option("--float32", is_flag=True, help="Store float32 embeddings (default float16).")
@click.option("--normalize", is_flag=True, help="L2-normalise the embeddings.")
@click.option("--skip-missing", is_flag=True, help="Record items of --interactions without an image as failed instead of stopping.")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache made with other settings.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="CUDA arithmetic: auto (bf16 autocast where supported, else fp16), fp32, bf16 or fp16. CPU: fp32.")
@click.option("--from-run", type=click.Path(file_okay=False),
              help="Encode with a trained run's item tower: the cache then holds the run's item vectors.")
@click.option("--follow-symlinks", is_flag=True,
              help="Also read covers that are symbolic links to files outside the --images folder "
                   "(refused and listed as failed without it).")
@click.option("--verify", type=click.Path(dir_okay=False),
              help="Instead of encoding: re-read this cache (or its .partial) and check every block's checksum; "
                   "exit 2 if it is damaged.")
@click.pass_context
def encode(ctx, images, out, interactions, encoder, old_model, pretrained, pooling, preset, image_size, seed,
           split_block, hidden, taps, batch_size, workers, device, float32, normalize, skip_missing, overwrite,
           precision, from_run, follow_symlinks, verify):
    """Encode covers once into an HDF5 embedding cache (resumable: rerun the same command).

    `pixelrec encode --verify CACHE` checks an existing cache instead.
    """
    from .encode import EncodeConfig, EncoderConfig, encode_images, verify_cache

    encoder = _renamed(ctx, "old_model")

    if verify is not None:
        others = sorted(_explicit(ctx) - {"verify"})
        if others:
            raise PixelrecError(f"--verify checks an existing cache and takes no other option; "
                                f"drop --{others[0].replace('_', '-')}")
        report = verify_cache(verify)
        if not report.ok:
            raise PixelrecError(report.summary())
        click.echo(report.summary())
        return
    for name, value in (("--images", images), ("--out", out)):
        if value is None:
            raise click.UsageError(f"Missing option '{name}' (or give --verify CACHE).")
    run_encoder = None
    if from_run:
        from .runs.new_items import run_item_encoder

        clash = {"encoder", "pretrained", "pooling", "preset", "image_size", "seed", "split_block", "normalize",
                 "hidden", "taps"} & _explicit(ctx)
        if clash:
            raise PixelrecError(f"--from-run takes the encoder from the run; drop --{sorted(clash)[0].replace('_', '-')}")
        from .runs.rundir import refuse_output_inside

        refuse_output_inside(out, from_run, "--out")
        run_encoder = run_item_encoder(from_run, "cpu")
    if preset == "pixelrec" and not from_run:
        given = dict(encoder=encoder, pooling=pooling, split_block=split_block, float32=float32, precision=precision)
        applied = _encode_preset(given, _explicit(ctx), pretrained)
        encoder, pooling, split_block, float32, precision = (applied[k] for k in given)
    cfg = EncodeConfig(images=images, out=out, interactions=interactions,
                       encoder=EncoderConfig(model=encoder, pretrained=pretrained, pooling=pooling, preset=preset,
                                             image_size=image_size, seed=seed),
                       batch_size=batch_size, num_workers=workers, device=device, float32=float32,
                       split_block=split_block, normalize=normalize, skip_missing=skip_missing,
                       overwrite=overwrite, precision=precision, follow_symlinks=follow_symlinks,
                       hidden=hidden, taps=taps)
    s = encode_images(cfg, encoder=run_encoder)
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
    _echo_failed(s.refused, "files in --images cannot be covers and were not encoded")


def _echo_failed(failed: dict[str, str], what: str) -> None:
    """List up to 10 failures on stderr, one line each (names quoted when they are not plain ids)."""
    from .data.ids import id_problem, shown

    if not failed:
        return
    click.echo(f"{len(failed)} {what}:", err=True)
    for name, reason in list(failed.items())[:10]:
        click.echo(f"  failed {name if id_problem(name) is None else shown(name)}: {reason}", err=True)
    if len(failed) > 10:
        click.echo(f"  ... and {len(failed) - 10} more", err=True)


# What `encode --preset pixelrec` sets besides the preprocessing (options given on the command line
# win): the reference's OpenAI ViT-B/32 (QuickGELU blocks), mean of the last hidden tokens, the
# tokens entering its 2 tuned blocks, stored and computed in float32.
ENCODE_PIXELREC_PRESET = {"encoder": "ViT-B-32-quickgelu", "pooling": "mean", "split_block": 2, "float32": True,
                          "precision": "fp32"}


def _encode_preset(given: dict[str, Any], typed: set[str], pretrained: str) -> dict[str, Any]:
    """The encode settings under --preset pixelrec, and print the full list it applies (rank 0)."""
    out = {k: (v if k in typed else ENCODE_PIXELREC_PRESET[k]) for k, v in given.items()}
    if process_rank() > 0:
        return out
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") + (" (given)" if k in typed else "")
             for k, v in out.items() if v is not False]
    click.echo("preset pixelrec: covers squashed to the model's input size (224x224 for ViT-B-32), bilinear, "
               "mean = std = 0.5; " + ", ".join(flags), err=True)
    if pretrained in ("", "none"):
        click.echo("warning: --preset pixelrec with --pretrained none: random weights are not the paper's model "
                   "(give OpenAI's ViT-B-32.pt)", err=True)
    return out


# ------------------------------------------------------------------------------------------- fit
_PATH_TYPES = {
    "file": click.Path(dir_okay=False),
    "dir": click.Path(file_okay=False),
    "any": click.Path(),
}
_PLAIN_TYPES = {int: click.INT, float: click.FLOAT, str: click.STRING}


def _click_option(opt: FitOption) -> Callable[[Callable], Callable]:
    """The click option of one FitConfig field, from its type, default and OptionSpec."""
    spec = opt.spec
    if opt.type is bool:
        if opt.default:  # on by default: `--no-...` turns it off
            return click.option(f"{opt.flag}/--no-{opt.flag[2:]}", default=True, show_default=True, help=spec.help)
        return click.option(opt.flag, is_flag=True, default=opt.default, help=spec.help)
    if spec.choices is not None:
        kind: click.ParamType = click.Choice(spec.choices)
    elif spec.path is not None:
        kind = _PATH_TYPES[spec.path]
    else:
        kind = _PLAIN_TYPES[opt.type]
    if opt.required:  # checked in `fit`: the value may also come from --config FILE
        return click.option(opt.flag, type=kind, help=f"{spec.help}  [required, here or in --config]")
    if spec.default_text is not None:  # resolved later (per model): say how, as click would show a default
        return click.option(opt.flag, type=kind, default=opt.default, help=f"{spec.help}  [default: {spec.default_text}]")
    return click.option(opt.flag, type=kind, default=opt.default, show_default=opt.default is not None, help=spec.help)


def _fit_setting_options(fn: Callable) -> Callable:
    """Add one option per FitConfig field (`fit_options`), in declaration order."""
    for opt in reversed(fit_options()):  # decorators apply bottom-up; --help lists top-down
        fn = _click_option(opt)(fn)
    return fn


@cli.command()
@click.option("--config", "config_file", type=click.Path(),
              help="Settings from a file: TOML, YAML or JSON in the shape of a run's config.json (`[model] dim = 64`), "
                   "or an earlier run's config.json (or its directory). Options given here win over the file; the "
                   "file's settings win over --preset.")
@click.option("--print-config", is_flag=True,
              help="Print the resolved settings (TOML; JSON with --json), which --config reads back, and exit "
                   "without training.")
@_fit_setting_options
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last finished epoch.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run in --out.")
@click.option("--tensorboard", "tensorboard_dir", type=click.Path(file_okay=False),
              help="Also write each epoch's loss, validation metrics and times as TensorBoard scalars into this "
                   "directory (needs pixelrec[tensorboard]).")
@click.option("--json", "as_json", is_flag=True, help="Print the result (with --print-config: the settings) as JSON.")
@click.pass_context
def fit(ctx: click.Context, config_file: str | None, print_config: bool, resume: bool, overwrite: bool,
        tensorboard_dir: str | None, as_json: bool, **settings: Any) -> None:
    """Train a sequence recommender; early-stops on validation NDCG@10 and writes RUN_DIR (--out).

    Settings come from the defaults, then --preset, then --config FILE, then the options given here.
    """
    from .recommend.config import FitConfig, apply_preset, check_window_options
    from .runs.config_file import apply_config_file, dump_settings, read_config_file

    if resume and overwrite:
        raise PixelrecError("--resume continues the run in --out and --overwrite replaces it: give only one")
    options = fit_options()
    cfg = FitConfig(interactions=settings["interactions"], out=settings["out"])
    for opt in options:
        cfg.set(opt.key, settings[opt.param_name])
    typed = {opt.key for opt in options if opt.param_name in _explicit(ctx)}
    given = typed
    if config_file is not None:
        given = apply_config_file(cfg, typed, read_config_file(config_file))
    apply_preset(cfg, cfg.preset, given)
    check_window_options(cfg, typed)
    if print_config:
        click.echo(dump_settings(cfg.validate(), "json" if as_json else "toml"), nl=False)
        return
    for flag, value in (("--interactions", cfg.interactions), ("--out", cfg.out)):
        if not value:
            raise click.UsageError(f"Missing option '{flag}' (give it here or in --config FILE).", ctx)
    from .runs.fit import fit as run_fit

    scalars = None
    if tensorboard_dir is not None and process_rank() == 0:
        from .runs.tensorboard import EpochScalars

        scalars = EpochScalars(tensorboard_dir)
    try:
        result = run_fit(cfg, resume=resume, overwrite=overwrite, on_epoch=scalars)
    finally:
        if scalars is not None:
            scalars.close()
    summary = {"run_dir": str(result.run_dir), "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
               "seconds": round(result.seconds, 1), "seconds_per_epoch": round(result.seconds_per_epoch, 2),
               "valid": result.valid, "test": result.test["overall"]}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        t = result.test["overall"]
        epochs = (f"best epoch {result.best_epoch} of {result.epochs_run}" if result.epochs_run
                  else "no training")
        click.echo(f"{result.run_dir}: {epochs}, test NDCG@10 {t['ndcg@10']:.4f} Recall@10 {t['recall@10']:.4f} "
                   f"({result.seconds:.0f}s, {result.seconds_per_epoch:.1f}s/epoch)")


# -------------------------------------------------------------------------------------- evaluate
@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--split", type=click.Choice(["test", "valid"]), default="test", show_default=True)
@click.option("--k", "ks", default="5,10,20", show_default=True, help="Cut-offs, comma-separated.")
@click.option("--spec", "index_spec", default=None,
              help="Evaluate through this FAISS index (index-factory string as in `pixelrec index --spec`, e.g. "
                   "IVF256,Flat, HNSW32) and report its recall against exact search.")
@click.option("--index", "old_index", hidden=True, help="Old name of --spec (kept for one release).")
@click.option("--nprobe", type=click.IntRange(min=1), help="IVF: lists probed per query.")
@click.option("--ef-search", type=click.IntRange(min=1), help="HNSW: efSearch.")
@click.option("--negatives", type=click.IntRange(min=0), default=0, show_default=True,
              help="Sampled protocol: N random non-interacted negatives per user (0 = full ranking).")
@click.option("--cold-threshold", type=click.IntRange(min=0), default=1, show_default=True,
              help="Targets with fewer training interactions count as cold.")
@click.option("--seed", type=_SEED, default=0, show_default=True, help="Seed of the sampled protocol.")
@click.option("--device", default="cpu", show_default=True, help="Where users are encoded and FAISS searches (cuda needs pixelrec[gpu]).")
@click.option("--batch-size", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Users encoded and searched at once (under torchrun, each rank takes whole batches).")
@click.option("--gpu-shards", type=click.Choice(GPU_LAYOUTS), default="shard", show_default=True,
              help="With --device cuda and several GPUs (faiss-gpu): split the index over them (shard) or copy it "
                   "to each (replicate).")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
@click.pass_context
def evaluate(ctx, run_dir, split, ks, index_spec, old_index, nprobe, ef_search, negatives, cold_threshold, seed, device,
             batch_size, gpu_shards, as_json):
    """Recall@k / NDCG@k of a trained run (every item ranked, the user's history excluded)."""
    from .runs.evaluate import evaluate_run
    from .index.report import format_report

    index_spec = _renamed(ctx, "old_index")
    options = {k: v for k, v in (("nprobe", nprobe), ("ef_search", ef_search)) if v is not None}
    if options and not index_spec:
        raise PixelrecError("--nprobe/--ef-search apply to an approximate index: add one, e.g. --spec IVF256,Flat")
    report = evaluate_run(run_dir, split=split, ks=_ks(ks), index_spec=index_spec, index_options=options,
                          negatives=negatives, cold_threshold=cold_threshold, seed=seed, device=device,
                          batch_size=batch_size, gpu_layout=gpu_shards)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


# -------------------------------------------------------------------------------------- retrieve
@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--user", help="A user id of the run's data: their full history is the query.")
@click.option("--history", help="Item ids, oldest first: comma-separated, or a JSON list for ids that hold commas.")
@click.option("--history-file", type=click.Path(dir_okay=False),
              help="A file with one item id per line, oldest first ('-' = stdin).")
@click.option("--users", "users_file", type=click.Path(dir_okay=False),
              help="File with one user id per line ('-' = stdin, 'all' = every user); streams JSONL.")
@click.option("--k", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), help="With --users: write the JSONL here (atomically) instead of stdout.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=1024, show_default=True,
              help="With --users: users encoded and searched at once (under torchrun, each rank takes whole batches).")
@click.option("--json", "as_json", is_flag=True, help="JSON output (single queries).")
@click.option("--html", "html_out", type=click.Path(dir_okay=False),
              help="Write a standalone HTML page (covers embedded as thumbnails) of the history and top-k "
                   "instead: for --user, --history, --history-file, or --users (at most 200 users).")
@click.option("--images", type=click.Path(),
              help="With --html: the covers (dir or LMDB); default: what the run records (needed for an id run).")
def retrieve(run_dir, user, history, history_file, users_file, k, out, device, batch_size, as_json, html_out,
             images):
    """Top-k items for a user, an ad-hoc history, or a file of users (history excluded)."""
    from .runs.retrieve import parse_history, read_lines, retrieve_batch, retrieve_html, retrieve_one

    given = [x for x in (user, history, history_file, users_file) if x is not None]
    if len(given) != 1:
        raise PixelrecError("give exactly one of --user, --history, --history-file or --users")
    if images is not None and html_out is None:
        raise PixelrecError("--images gives the covers of --html; add --html FILE or drop --images")
    if html_out is not None:
        if out is not None or as_json:
            raise PixelrecError("--html writes a page instead of --out / --json output; give one of them")
        if process_rank() > 0:
            return
        items = parse_history(history) if history is not None else (
            read_lines(history_file, "one item id per line") if history_file is not None else None)
        made = retrieve_html(run_dir, html_out, user=user, history=items, users=users_file, k=k, images=images,
                             device=device)
        unknown = made["unknown"]
        click.echo(f"wrote {html_out}: {made['queries']} queries, {made['covers']} covers embedded"
                   + (f"; {len(unknown)} unknown user ids: {', '.join(unknown[:5])}"
                      + ("..." if len(unknown) > 5 else "") if unknown else ""), err=True)
        return
    if out is not None and users_file is None:
        raise PixelrecError("--out writes the JSONL of --users; a single query prints to stdout (use --json and a redirect)")
    if users_file is not None:
        summary = retrieve_batch(run_dir, users_file, k=k, out=out, device=device, batch_size=batch_size)
        unknown = summary.unknown
        if process_rank() == 0:
            click.echo(f"retrieved for {summary.served} users"
                       + (f"; {len(unknown)} unknown user ids: {', '.join(unknown[:5])}"
                          + ("..." if len(unknown) > 5 else "") if unknown else "")
                       + (f"; wrote {out}" if out else ""), err=True)
        return
    if process_rank() > 0:  # a single query is answered once, by rank 0
        return
    items = None
    if history is not None:
        items = parse_history(history)
    elif history_file is not None:
        items = read_lines(history_file, "one item id per line")
    result = retrieve_one(run_dir, user=user, history=items, k=k, device=device)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        who = f"user {result.user_id}" if result.user_id else "history"
        click.echo(f"top {k} for {who} ({len(result.history)} items of history excluded):")
        for rank, (item, score) in enumerate(zip(result.items, result.scores), 1):
            click.echo(f"{rank:>4}  {item}  {score:.4f}")


# ----------------------------------------------------------------------------------------- index
@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--spec", default="Flat", show_default=True, help="FAISS index-factory string: Flat, IVF1024,Flat, IVF1024,PQ16, HNSW32, OPQ16,IVF1024,PQ16 ...; "
                   "prefix IP2L2, to search inner products as L2 distances (IP2L2,IVF1024,PQ65x4fs,RFlat).")
@click.option("--metric", type=click.Choice(["ip", "cosine"]), default="ip", show_default=True, help="The model scores by inner product.")
@click.option("--nprobe", type=click.IntRange(min=1), help="IVF: lists probed per query (stored with the index).")
@click.option("--ef-search", type=click.IntRange(min=1), help="HNSW: efSearch (stored with the index).")
@click.option("--add-images", type=click.Path(), help="Encode these new covers through the run's trained tower and add them.")
@click.option("--follow-symlinks", is_flag=True,
              help="--add-images: also read covers that are symbolic links to files outside the folder.")
@click.option("--target-recall", type=float,
              help="Tune instead: publish the fastest index whose recall@k against exact search reaches this "
                   "(0 < R <= 1) on sampled users of the run, half of them held out; exact search (Flat) "
                   "is kept when no approximate index is faster.")
@click.option("--k", type=click.IntRange(min=1), default=10, show_default=True, help="--target-recall: recall@k.")
@click.option("--sample", type=click.IntRange(min=2), default=2000, show_default=True,
              help="--target-recall: users sampled (half to tune on, half held out).")
@click.option("--device", default="cpu", show_default=True)
@click.pass_context
@rank_zero_only
def index(ctx, run_dir, spec, metric, nprobe, ef_search, add_images, follow_symlinks, target_recall, k, sample, device):
    """(Re)build the run's item index, tune it to a recall target, or add new items from their covers."""
    from .index.tuning import check_target, frontier_table
    from .runs.item_index import add_images_to_run, rebuild_run_index, tune_run_index

    typed = _explicit(ctx)
    if follow_symlinks and not add_images:
        raise PixelrecError("--follow-symlinks applies to --add-images")
    if target_recall is None and {"k", "sample"} & typed:
        raise PixelrecError(f"--{sorted({'k', 'sample'} & typed)[0]} applies to tuning; give --target-recall too")
    if target_recall is not None:
        clash = sorted({"spec", "nprobe", "ef_search", "add_images"} & typed)
        if clash:
            raise PixelrecError(f"--target-recall chooses the index and its search breadth itself; "
                                f"drop --{clash[0].replace('_', '-')}")
        check_target(target_recall)
        tuning = tune_run_index(run_dir, target_recall, k=k, sample=sample, metric=metric, device=device)
        chosen = tuning.chosen
        click.echo(f"{run_dir}/index: {tuning.index.describe()}")
        if tuning.why_flat:
            click.echo(f"kept exact search (Flat, {tuning.flat_queries_per_s:,.0f} queries/s): {tuning.why_flat}")
        else:
            click.echo(f"recall@{k} {chosen.recall:.4f} on {len(tuning.sample.heldout)} held-out users (tuning half "
                       f"{chosen.tuning_recall:.4f}, target {target_recall:g}); {chosen.speedup:.1f}x Flat's queries/s "
                       f"({chosen.queries_per_s:,.0f} vs {tuning.flat_queries_per_s:,.0f})")
        click.echo(frontier_table(tuning.points, chosen))
        return
    if add_images:
        rebuild_only = sorted({"spec", "metric", "nprobe", "ef_search"} & _explicit(ctx))
        if rebuild_only:
            flag = "--" + rebuild_only[0].replace("_", "-")
            raise PixelrecError(f"--add-images adds to the run's existing index; {flag} applies when rebuilding it "
                                f"(run `pixelrec index RUN_DIR {flag} ...` on its own)")
        summary = add_images_to_run(run_dir, add_images, device=device, follow_symlinks=follow_symlinks)
        ids = f" (ids {summary.first_id}..{summary.last_id})" if summary.added else ""
        click.echo(f"added {summary.added} items to {run_dir}{ids}"
                   + (f"; {summary.skipped} already indexed" if summary.skipped else "")
                   + (f"; {len(summary.failed)} images failed" if summary.failed else ""))
        _echo_failed(summary.failed, "covers were not added")
        return
    idx = rebuild_run_index(run_dir, spec=spec, metric=metric, nprobe=nprobe, ef_search=ef_search, device=device)
    click.echo(f"{run_dir}/index: {idx.describe()}")


# --------------------------------------------------------------------------------------- compare
COMPARE_FORMATS = ("text", "csv", "markdown", "json")


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(), metavar="RUN...")
@click.option("--format", "fmt", type=click.Choice(COMPARE_FORMATS), default="text", show_default=True,
              help="Table layout: aligned text, CSV, a Markdown table, or JSON (a list of rows).")
@click.option("--sort", help="Order rows by this column (e.g. ndcg@10, 'ndcg@10 cold', s/epoch, lr): quality "
                             "metrics best first, other columns ascending. Default: the order given.")
@click.option("--plot", type=click.Path(dir_okay=False),
              help="Also draw the runs' validation NDCG@10 per epoch into this image (.png, .pdf or .svg).")
@rank_zero_only
def compare(run_dirs, fmt, sort, plot):
    """One table across finished runs: model, item tower, encoder, the settings that differ, test
    NDCG@10 / Recall@10 (overall, warm, cold items), epochs and times.

    Reads what the runs recorded (config.json, results.json, metrics.jsonl); loads no model. A
    directory that is no finished run is listed on stderr and skipped; none usable is an error.
    """
    from .runs.compare import compare_runs, plot_curves
    from .runs.rundir import refuse_output_inside

    for run_dir in run_dirs if plot else ():  # the plot must not replace a file of a run it reads
        refuse_output_inside(plot, run_dir, "--plot")
    table = compare_runs(list(run_dirs), sort=sort)
    for run_dir, why in table.skipped:
        click.echo(f"skipped {run_dir}: {why}", err=True)
    if plot:
        plot_curves(table, plot)
    click.echo(_format_table(table.columns, table.rows, fmt), nl=False)
    if plot:
        click.echo(f"plot: {plot}", err=True)


def _format_table(columns: list[str], rows: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    if fmt == "csv":
        import csv
        import io

        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([["" if r[c] is None else r[c] for c in columns] for r in rows])
        return out.getvalue()
    cells = [[_cell(c, r[c]) for c in columns] for r in rows]
    if fmt == "markdown":
        lines = [columns, ["---"] * len(columns), *cells]
        return "".join("| " + " | ".join(x.replace("|", "\\|") for x in line) + " |\n" for line in lines)
    widths = [max(len(x) for x in col) for col in zip(columns, *cells)]
    return "".join("  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() + "\n" for line in [columns, *cells])


def _cell(column: str, value: Any) -> str:
    """A value as the text and Markdown tables show it."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if column.startswith(("ndcg@", "recall@")):
            return f"{value:.4f}"
        if column == "s/epoch":
            return f"{value:.2f}"
        if column == "wall s":
            return f"{value:.1f}"
        return f"{value:g}"
    return str(value)


# ----------------------------------------------------------------------------------------- serve
@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0 = any free port.")
@click.option("--device", default="cpu", show_default=True, help="Where the user tower runs and covers are encoded.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Server processes; each loads the run and picks up the others' additions within a second.")
@click.option("--batch-window-ms", type=float, default=2.0, show_default=True,
              help="Gather concurrent queries this long into one batch (one forward, one search); 0 = off.")
@click.option("--max-batch", type=click.IntRange(min=1), default=256, show_default=True,
              help="Most queries in one micro-batch.")
@click.option("--max-upload-mb", type=float, default=20.0, show_default=True,
              help="Largest request body (POST /items covers); larger ones get 413.")
@click.option("--max-upload-files", type=click.IntRange(min=1), default=64, show_default=True,
              help="Most covers in one POST /items; more get 413.")
@click.option("--read-only", is_flag=True, help="Refuse every request that changes the run (POST /items) with 403.")
@click.option("--api-key", "api_key_file", metavar="FILE",
              help="A file (mode 600) holding a token that POST /items must carry ('Authorization: Bearer TOKEN' "
                   "or 'X-API-Key: TOKEN'); needed to add items when --host is beyond loopback.")
@click.option("--max-connections", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Open connections (and requests in progress) before new ones get 503.")
@click.option("--body-timeout-s", type=float, default=120.0, show_default=True,
              help="Seconds a request body may take to arrive; slower ones get 408.")
@click.option("--images", type=click.Path(),
              help="The training covers (dir or LMDB) for GET /items/{id}/cover and the page at /: needed for an "
                   "id run; default: what the run records (e2e --images, or the images its cache was encoded from).")
@click.option("--check", "check_only", is_flag=True, help="Load the run and bind the address, then exit without serving.")
@click.pass_context
@rank_zero_only
def serve(ctx, run_dir, host, port, device, workers, batch_window_ms, max_batch, max_upload_mb, max_upload_files,
          read_only, api_key_file, max_connections, body_timeout_s, images, check_only):
    """Serve a run over HTTP (FastAPI): a browsing page at /, /recommend, /items/{id}/similar,
    /items/{id}/cover, POST /items; API docs at /docs (offline).

    Adding items (POST /items) is open on loopback only; beyond it, it needs --api-key."""
    from .runs.serving import ServeConfig, serve as run_server

    quiet = quiet_given(ctx)
    cfg = ServeConfig(run_dir=run_dir, host=host, port=port, device=device, workers=workers,
                      batch_window_ms=batch_window_ms, max_batch=max_batch, max_upload_mb=max_upload_mb,
                      read_only=read_only, api_key_file=api_key_file, max_upload_files=max_upload_files,
                      max_connections=max_connections, body_timeout_s=body_timeout_s, images=images)

    def announce(started) -> None:
        verb = "ready to serve" if check_only else "serving"
        click.echo(f"{verb} {run_dir} ({started.items} items, {started.users} users, index version "
                   f"{started.index_version}) on {started.url}; browse at {started.url}/, API docs at "
                   f"{started.url}/docs", err=True)
        for warning in started.warnings:
            click.echo(warning, err=True)

    run_server(cfg, check_only=check_only, quiet=quiet, announce=announce)


# ------------------------------------------------------------------------------------------ demo
_DEMO_TOWERS = ("id", "frozen", "partial", "e2e", "hybrid")  # = DemoConfig.towers (demo.py imports torch: not here)


@cli.command()
@click.option("--workdir", default="pixelrec-demo", show_default=True, type=click.Path(file_okay=False),
              help="Where the data, cache, runs and plot go.")
@click.option("--towers", default=",".join(_DEMO_TOWERS), show_default=True,
              help="Item towers to compare (hybrid: also at other --id-dropout rates, for the warm/cold frontier).")
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True,
              help="Most epochs per tower (early stopping, patience 5).")
@click.option("--users", type=click.IntRange(min=1), default=2000, show_default=True)
@click.option("--items", type=click.IntRange(min=1), default=400, show_default=True)
@click.option("--seed", type=_SEED, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@rank_zero_only
def demo(workdir, towers, epochs, users, items, seed, device):
    """The embedded default: synth -> encode -> fit id/frozen/partial/e2e/hybrid -> compare -> retrieve."""
    from .demo import DemoConfig, run_demo

    kinds = tuple(t.strip() for t in towers.split(",") if t.strip())
    unknown = [t for t in kinds if t not in ITEM_KINDS]
    if unknown or not kinds:
        raise PixelrecError(f"--towers: unknown tower(s) {', '.join(unknown) or '(none given)'}; "
                            f"choose from {', '.join(ITEM_KINDS)}")
    r = run_demo(DemoConfig(workdir=workdir, towers=kinds, epochs=epochs, users=users, items=items,
                            cold_items=max(1, items // 10), seed=seed, device=device))
    click.echo("\nTest split, every item ranked, each user's history excluded:")
    click.echo(r.table)
    click.echo(f"\nplot: {r.plot}")
    ret = r.retrieval
    click.echo(f"\npixelrec retrieve {ret['run_dir']} --user {ret['user_id']} --k 5")
    click.echo(f"  history ({len(ret['history'])} items): {', '.join(ret['history'][-8:])}")
    for rank, (item, score) in enumerate(zip(ret["items"], ret["scores"]), 1):
        click.echo(f"  {rank}. {item}  {score:.4f}")
    click.echo(f"\ndone in {r.seconds:.0f}s; runs are in {workdir}/ (try `pixelrec evaluate {ret['run_dir']}`)")


def main() -> None:
    cli(prog_name="pixelrec")


if __name__ == "__main__":
    main()
