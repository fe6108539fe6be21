"""benchmark.py --loader: how fast the data pipeline alone feeds images, per CPU core, this
repo's (my_dataset.MyDataSet with train.py's transforms and draft decoding, through
my_dataset.make_loader) against the tutorial's (its dataset class, RandomResizedCrop, flip,
ToTensor, Normalize), on the same JPEGs, taking turns, median of --rounds.

    python benchmark.py --loader --data-path DIR --img-size 224 --workers 1

With N workers the rate is divided by N (0 workers: the main process loads, one core). Without
--data-path it reads 256 photos of 500x375 px that it writes first. A loader slower than the
training step it feeds leaves the GPU (or CPU) waiting: train.py's epoch line says how much."""
import tempfile
import time

import torch

import my_dataset
import transforms
from benchmarks.measuring import Table, median, write_photos
from benchmarks.tutorial_train import Images, pipelines
from model import VARIANTS
from utils import list_images

BATCH = 32


def rate(dataset, workers, collate=None):
    """Images per second through a DataLoader of `dataset`, after a warm-up pass (workers started,
    files in the page cache)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers,
                                         persistent_workers=workers > 0, collate_fn=collate)
    for _ in loader:
        pass
    start = time.perf_counter()
    n = sum(len(batch[0]) for batch in loader)
    return n / (time.perf_counter() - start)


def pipelines_of_this_repo(paths, size):
    """(training, evaluation) datasets as train.py builds them, with its default crop scale."""
    variant, scale = VARIANTS["b0"], (0.25, 1.0)
    train = my_dataset.MyDataSet(paths, [0] * len(paths), transforms.build_transform(variant, size, True, scale),
                                 draft_size=transforms.train_draft_size(size, scale[0]))
    evaluation = my_dataset.MyDataSet(paths, [0] * len(paths), transforms.build_transform(variant, size, False),
                                      draft_size=transforms.eval_draft_size(variant.eval_sizes(size)[0]))
    return train, evaluation


def run(args):
    size, workers = args.img_size or 224, args.workers
    with tempfile.TemporaryDirectory() as tmp:
        paths = sorted(list_images(args.data_path)) if args.data_path else write_photos(tmp, 256, (500, 375))
        if not paths:
            raise SystemExit(f"error: no images under {args.data_path}")
        ours_train, ours_eval = pipelines_of_this_repo(paths, size)
        tutorial_train, tutorial_eval = (Images([(p, 0) for p in paths], tf) for tf in pipelines(size))
        print(f"{len(paths)} images{' from ' + args.data_path if args.data_path else ' of 500x375 px'} at {size} px, "
              f"batch {BATCH}, {workers} workers, median of {args.rounds} rounds; images per second per core")
        cores = max(workers, 1)
        figures = {name: [] for name in ("train", "tutorial train", "eval", "tutorial eval")}
        for _ in range(args.rounds):  # taking turns: a busy machine slows both alike
            figures["train"].append(rate(ours_train, workers, my_dataset.MyDataSet.collate_fn) / cores)
            figures["tutorial train"].append(rate(tutorial_train, workers) / cores)
            figures["eval"].append(rate(ours_eval, workers, my_dataset.MyDataSet.collate_fn) / cores)
            figures["tutorial eval"].append(rate(tutorial_eval, workers) / cores)
    table = Table("loader, per core")
    table.row("evaluation pipeline vs the tutorial's", median(figures["tutorial eval"]), median(figures["eval"]),
              "img/s")
    table.row("training pipeline vs the tutorial's", median(figures["tutorial train"]), median(figures["train"]),
              "img/s")
    return table.rows
