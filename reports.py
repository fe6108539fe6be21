"""The files and figures a run writes beside its checkpoints, and what its validation figures say:
metrics.csv and curves.png (per epoch), per_class.csv, confusion_matrix.png, predictions.csv and
mistakes.png (the best epoch), class_distribution.png, and predict.py's --plot grid. Every file
is written whole (outputs.atomic_write)."""
import csv
import math
import os

import torch

from cli import printable
from my_dataset import load_rgb
from outputs import atomic_write, atomic_write_text


# data_time: the seconds training waited for the loader in the epoch; data_wait: their share of it
METRIC_FIELDS = ["epoch", "lr", "train_loss", "val_loss", "val_top1", "val_top5", "epoch_seconds", "data_time",
                 "images_per_second", "data_wait"]


def write_metrics(path, history):
    """metrics.csv, a row per epoch; a field that epochs of a resumed older run lack is nan there."""
    lines = [",".join(METRIC_FIELDS)]
    lines += [",".join(_fmt(row.get(k, math.nan)) for k in METRIC_FIELDS) for row in history]
    atomic_write_text(path, "\n".join(lines) + "\n")


class TensorBoardLog:
    """--tensorboard: each epoch's row of metrics.csv as TensorBoard scalars, in event files in the
    run folder (`tensorboard --logdir weights/` shows every run beside the others). `start`: the
    first epoch this command trains; on --resume, what an interrupted command logged from there on
    is hidden, so each epoch is drawn once. Needs the tensorboard package (TENSORBOARD_INSTALL)."""

    TAGS = {"train_loss": "loss/train", "val_loss": "loss/val", "val_top1": "accuracy/val_top1",
            "val_top5": "accuracy/val_top5", "lr": "lr", "images_per_second": "speed/images_per_second",
            "data_wait": "speed/data_wait_share"}

    def __init__(self, folder, start):
        from torch.utils.tensorboard import SummaryWriter  # only here: the package is optional
        self.writer = SummaryWriter(folder, purge_step=start if start > 1 else None)

    def epoch(self, row):
        for field, tag in self.TAGS.items():
            if math.isfinite(row[field]):
                self.writer.add_scalar(tag, row[field], row["epoch"])
        self.writer.flush()

    def close(self):
        self.writer.close()


TENSORBOARD_INSTALL = "pip install -r requirements-tensorboard.txt"


def _fmt(value):
    return str(value) if isinstance(value, int) else f"{value:.6g}"


def read_metrics(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def per_class_rows(confusion, classes):
    """precision, recall, F1 and support of each class from a confusion matrix (rows = truth)."""
    rows = []
    for i, name in enumerate(classes):
        tp = confusion[i, i].item()
        predicted, support = confusion[:, i].sum().item(), confusion[i].sum().item()
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"class": name, "precision": precision, "recall": recall, "f1": f1, "support": support})
    return rows


def recall_line(confusion, classes, most=10):
    """'recall  cat 0.95  dog 0.60 ...': every class's, or the `most` lowest where there are more."""
    rows = per_class_rows(confusion, classes)
    if len(rows) > most:
        rows = sorted(rows, key=lambda r: r["recall"])[:most]
    label = "recall" if len(rows) == len(classes) else f"lowest recall ({len(rows)} of {len(classes)} classes)"
    return f"{label}  " + "  ".join(f"{printable(r['class'])} {r['recall']:.2f}" for r in rows)


def learning_problem(confusion, classes):
    """Why the validation results say that nothing has been learned (yet), or None: one class
    takes (nearly) all predictions, or top-1 is no better than always answering the largest class."""
    total = confusion.sum().item()
    if not total:
        return None
    predicted = confusion.sum(0)
    top = predicted.argmax().item()
    if predicted[top].item() >= 0.95 * total:
        return f"{predicted[top].item()} of {total} validation images are predicted as '{printable(classes[top])}'"
    largest = confusion.sum(1).max().item() / total
    accuracy = confusion.trace().item() / total
    if accuracy <= largest + 0.02:
        return f"validation top-1 {accuracy:.2f} is no better than always answering the largest class ({largest:.2f})"
    return None


def write_per_class(path, confusion, classes):
    rows = per_class_rows(confusion, classes)
    lines = ["class,precision,recall,f1,support"]
    lines += [f"{csv_field(r['class'])},{r['precision']:.4f},{r['recall']:.4f},{r['f1']:.4f},{r['support']}"
              for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


def csv_field(text):
    """A cell as RFC 4180 quotes it: a lone \\r ends a row for most readers, as \\n does."""
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n\r') else text


def write_mistakes(folder, predictions, split, title, limit=48):
    """predictions.csv (every validation image: path, true and predicted class, the probability of
    each) and mistakes.png (the `limit` most confident mistakes) in `folder`; a line that says so."""
    classes, index = split.classes, predictions["index"].tolist()
    paths = [split.val_images[i] for i in index]
    true = [split.val_labels[i] for i in index]
    predicted, prob, prob_true = (predictions[k].tolist() for k in ("predicted", "prob", "prob_true"))
    rows = ["path,true,predicted,prob,prob_true,correct"]
    rows += [",".join([csv_field(path), csv_field(classes[t]), csv_field(classes[p]), f"{q:.4f}", f"{qt:.4f}",
                       str(int(t == p))]) for path, t, p, q, qt in zip(paths, true, predicted, prob, prob_true)]
    atomic_write_text(os.path.join(folder, "predictions.csv"), "\n".join(rows) + "\n")
    wrong = sorted((i for i in range(len(paths)) if true[i] != predicted[i]), key=lambda i: -prob[i])
    if not wrong:
        return f"no mistakes: all {len(paths)} validation images right (predictions.csv lists them)"
    # true and predicted class on lines of their own: two long names on one line ran into the next tile
    tiles = [(paths[i], f"{printable(classes[true[i]])[:22]}\n-> {printable(classes[predicted[i]])[:18]} ({prob[i]:.2f})")
             for i in wrong[:limit]]
    plot_tiles(tiles, os.path.join(folder, "mistakes.png"),
               f"{title}: {len(wrong)} of {len(paths)} wrong, most confident first (true -> predicted (prob))")
    shown = f"the {len(tiles)} most confident of {len(wrong)}" if len(tiles) < len(wrong) else f"all {len(wrong)}"
    return (f"mistakes.png: {shown} wrong validation images; predictions.csv: all {len(paths)}, "
            "with the probability of the true class")


# ---------------------------------------------------------------------------------------------
# Figures (matplotlib, files only)
# ---------------------------------------------------------------------------------------------

def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    pyplot().close(fig)


def plot_curves(history, path, num_classes, best_epoch=None):
    """Loss, accuracy and learning rate per epoch, the best epoch (best.pth's) marked; top-5 only
    where it says something (more than 5 classes, and not 1.0 throughout); the accuracy axis spans
    the values drawn, so the epochs that matter are not squashed against the top. An epoch that
    read no validation image has NaN there."""
    plt = pyplot()
    epochs = [row["epoch"] for row in history]
    best = next((r for r in history if r["epoch"] == best_epoch), None) or max(
        history, key=lambda r: r["val_top1"] if r["val_top1"] == r["val_top1"] else -1)  # the first of equals
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(13, 3.9))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], "o-", label="validation")
    # the training loss is on augmented crops and label-smoothed targets, so it can sit above the
    # validation loss without anything being wrong; the title says so where people look
    ax_loss.set(title="loss (training: augmented, label-smoothed)", xlabel="epoch")
    drawn = [r["val_top1"] for r in history]
    ax_acc.plot(epochs, drawn, "o-", label="top-1")
    if num_classes > 5 and min(r["val_top5"] for r in history) < 0.995:
        ax_acc.plot(epochs, [r["val_top5"] for r in history], "o-", label="top-5")
        drawn += [r["val_top5"] for r in history]
    ax_acc.plot([best["epoch"]], [best["val_top1"]], "*", color="crimson", markersize=14,
                label=f"best: epoch {best['epoch']}, {best['val_top1']:.3f}")
    low = max(0.0, math.floor((min([v for v in drawn if v == v] or [0.0]) - 0.02) * 20) / 20)  # to a multiple of 0.05
    ax_acc.set(title="validation accuracy", xlabel="epoch", ylim=(low, 1.005 + (1 - low) * 0.02))
    ax_lr.plot(epochs, [r["lr"] for r in history], "o-")
    ax_lr.set(title="learning rate (end of epoch)", xlabel="epoch")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.axvline(best["epoch"], color="crimson", alpha=0.25, linestyle="--")
    for ax in (ax_loss, ax_acc):  # below the axes, never over the curves
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False, fontsize=8)
    save_figure(fig, path)


def plot_tiles(tiles, path, title=None):
    """A grid of (image path, caption) tiles, 8 to a row, each image shown whole with its file name."""
    plt = pyplot()
    cols = min(8, len(tiles))
    rows = math.ceil(len(tiles) / cols)
    lines = max(caption.count("\n") for _, caption in tiles) + 2  # the caption's and the file name's
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, (1.82 + 0.14 * lines) * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, caption) in zip(axes.flat, tiles):
        try:
            img = load_rgb(image, 256)
            img.thumbnail((160, 160))
            ax.imshow(img)
        except Exception:  # gone or broken since it was evaluated
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{caption}\n{printable(os.path.basename(image))[:24]}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def plot_confusion(confusion, classes, path, title="confusion matrix"):
    plt = pyplot()
    n = len(classes)
    size = min(4 + 0.45 * n, 30)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    recall = confusion.double() / confusion.sum(1, keepdim=True).clamp(min=1)
    im = ax.imshow(recall.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels([printable(c) for c in classes], rotation=90 if n > 6 else 0)
    ax.set_yticklabels([printable(c) for c in classes])
    if n <= 30:  # counts stay legible up to about 30 classes
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if recall[i, j] > 0.5 else "black")
    save_figure(fig, path)


def plot_class_distribution(split, path):
    plt = pyplot()
    n = len(split.classes)
    train = torch.bincount(torch.as_tensor(split.train_labels), minlength=n).tolist()
    val = torch.bincount(torch.as_tensor(split.val_labels), minlength=n).tolist()
    fig, ax = plt.subplots(figsize=(min(4 + 0.5 * n, 30), 4))
    ax.bar(range(n), train, label=f"train ({sum(train)})")
    ax.bar(range(n), val, bottom=train, label=f"validation ({sum(val)})")
    ax.set_xticks(range(n))
    ax.set_xticklabels([printable(c) for c in split.classes], rotation=90 if n > 8 else 0)
    ax.set(xlabel="class", ylabel="images", title="images per class")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)  # beside the bars, not on them
    save_figure(fig, path)
