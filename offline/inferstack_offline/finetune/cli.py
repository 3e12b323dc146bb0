"""`inferstack finetune DATA --out DIR ...`: arguments here (light), the work in .run (heavy)."""

from __future__ import annotations

import argparse
import sys

from .search import DEFAULT_SEARCH

DESCRIPTION = """Train a classifier for your own classes by transfer learning and serve it as it is.

DATA is a folder with one sub-folder per class (the folder names are the labels), or a table
(.csv, .tsv, .jsonl, .parquet) with columns path and label. The frozen base computes features for
every image once (cached under --cache, so a re-run or an interrupted run resumes), a search trains
new classifier heads on them as parallel Spark tasks, and the best becomes OUT/model.keras with
OUT/labels.txt, OUT/metrics.json, OUT/search.png, OUT/confusion.png and OUT/calibration/ (for int8):

  make run INFERSTACK_MODEL=OUT/model.keras INFERSTACK_LABELS=OUT/labels.txt
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", metavar="DATA", help="folder of class folders, or a table with path and label columns")
    p.add_argument("--out", required=True, metavar="DIR", help="where the model, labels and metrics go")
    p.add_argument("--base", default="ResNet50",
                   help="a keras.applications architecture (default ResNet50) or a saved .keras classifier")
    p.add_argument("--weights", default="imagenet",
                   help="imagenet (a .keras base: its own weights), none (random init), or a weights file")
    p.add_argument("--search", default=DEFAULT_SEARCH,
                   help=f"grid of head settings, NAME=V1,V2 ... over lr, dropout, units, l2, epochs, batch, "
                        f"patience (default {DEFAULT_SEARCH!r})")
    p.add_argument("--trials", type=int, help="run this many settings drawn from the grid (default: all)")
    p.add_argument("--master", default="local[*]", help="Spark master (default local[*])")
    p.add_argument("--spark-conf", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Spark configuration, repeatable")
    p.add_argument("--fine-tune-layers", type=int, default=0, metavar="N",
                   help="then train the top N layers of the base too, at a low learning rate (default 0)")
    p.add_argument("--fine-tune-lr", type=float, help="learning rate for that (default: the best trial's / 10)")
    p.add_argument("--fine-tune-epochs", type=int, default=10, help="at most this many epochs (default 10)")
    p.add_argument("--val-split", type=float, default=0.2, help="fraction of each class held out (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed for the split, the trials and initialisation")
    p.add_argument("--min-images", type=int, default=5, help="refuse classes with fewer usable images (default 5)")
    p.add_argument("--feature-layer", help="a .keras base: the layer whose output are the features "
                                           "(default: the input of its last Dense classifier)")
    p.add_argument("--image-size", type=int, help="a keras.applications base: input side in pixels")
    p.add_argument("--cache", metavar="DIR", help="feature cache (default OUT/cache)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch through the base (default 32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> object:
    from .run import Options

    if not 0 < args.val_split < 1:
        parser.error("--val-split must be between 0 and 1")
    if args.trials is not None and args.trials < 1:
        parser.error("--trials must be >= 1")
    if args.min_images < 2:
        parser.error("--min-images must be >= 2 (one image for training, one for validation)")
    conf = {}
    for item in args.spark_conf:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--spark-conf {item!r} is not KEY=VALUE")
        conf[key] = value
    return Options(
        data=args.data, out=args.out, base=args.base, weights=args.weights, search=args.search,
        trials=args.trials, master=args.master, spark_conf=conf, fine_tune_layers=args.fine_tune_layers,
        fine_tune_lr=args.fine_tune_lr, fine_tune_epochs=args.fine_tune_epochs, val_split=args.val_split,
        seed=args.seed, min_images=args.min_images, feature_layer=args.feature_layer, image_size=args.image_size,
        cache=args.cache, batch_size=args.batch_size, progress=False if args.no_progress else None,
    )


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Parsed arguments -> the pipeline; user errors exit 2 with one sentence, Ctrl-C exits 130."""
    opts = _options(args, parser)
    try:
        from inferstack.config import ConfigError

        from .dataset import DataError
        from .run import finetune
    except ImportError as exc:
        sys.exit(f"inferstack finetune: {exc.name} is missing; install it with pip install 'inferstack[finetune]'")
    try:
        metrics = finetune(opts)  # type: ignore[arg-type]
    except (ConfigError, DataError) as exc:
        print(f"inferstack finetune: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("inferstack finetune: interrupted; the same command resumes from the cached features", file=sys.stderr)
        sys.exit(130)
    best, search = metrics["best"], metrics["search"]
    settings = " ".join(f"{k}={v}" for k, v in best["settings"].items())
    print(f"inferstack finetune: best of {len(search['trials'])} trials: {settings}; validation top-1 "
          f"{best['val_top1']:.3f}, top-5 {best['val_top5']:.3f}. Trials took {search['sum_trial_s']:.1f} s "
          f"together in {search['wall_s']:.1f} s on {search['slots']} slot(s).\n"
          f"{_tuned_text(metrics['fine_tune'])}"
          f"Serve it: make run INFERSTACK_MODEL={metrics['model']} INFERSTACK_LABELS={metrics['labels']}",
          file=sys.stderr)


def _tuned_text(tuned: dict | None) -> str:
    if not tuned:
        return ""
    outcome = "kept" if tuned["kept"] else "not kept: the model without it is exported"
    return (f"Fine-tuning {len(tuned['layers'])} base layer(s): validation top-1 {tuned['val_top1_before']:.3f} -> "
            f"{tuned['val_top1_after']:.3f} ({outcome}).\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="inferstack finetune", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    run(args, parser)
