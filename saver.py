"""The files of a training run, and the one rule for which epoch best.pth holds.

    saver = Saver(args, models, meta, progress, optimization, split)
    saver.start(new=True)                  # the run folder, locked; class_indices.json, last.pth at epoch 0
    saver.epoch_end(row, result)           # best.pth if better, last.pth, metrics.csv, curves.png
    saver.finish()                         # confusion_matrix.png, per_class.csv, mistakes.png, last words

A run folder (default weights/<model>-<dataset>, then -2, -3, ...) is never reused by a new run,
and only the process that trains writes to it (outputs.lock_folder). Every file is written whole
or not at all (outputs.atomic_write), so a run stopped anywhere can be resumed from last.pth.
Under torchrun every process calls the same methods; only rank 0 writes.
"""
import os
import shlex
import shutil
import sys

import checkpoint
import errors
import model_files
import outputs
import reports
import runtime
import utils


class Saver:
    """best.pth, last.pth and the run's reports (metrics.csv, curves.png, TensorBoard's events):
    `progress` (checkpoint.Progress) is where the run stands, updated here and saved in last.pth;
    `saved` the last epoch whose state last.pth holds."""

    def __init__(self, args, models, meta, progress, optimization, split):
        self.args, self.models, self.meta, self.progress = args, models, meta, progress
        self.optimization, self.split = optimization, split
        self.saved = progress.epoch
        self.board = None

    def out(self, name):
        return os.path.join(self.args.output_dir, name)

    def start(self, new):
        """The run folder, locked for the process that writes it: a new one, or the resumed run's
        (cleaned of writes a kill cut short), with what is known before training. A new folder gets
        its first last.pth (epoch 0) at once, so that a run stopped in its first epoch can be
        resumed; stopped before that, the folder is removed again. Rank 0 makes the folder, and
        every process learns its name (each one's messages name it) or rank 0's refusal."""
        made, self.args.output_dir = runtime.on_rank0(lambda: self.prepare_folder(new))
        try:
            if new:
                self.save_last()  # every process's part of it: its RNG state
        except BaseException as e:
            self.unmake(made, e)
        if self.args.tensorboard and runtime.rank() == 0:
            self.board = reports.TensorBoardLog(self.args.output_dir, self.progress.epoch + 1)

    def prepare_folder(self, new):
        """(whether this call made the folder, its path), on rank 0."""
        made = False
        try:
            if new:
                made = make_run_dir(self.args)
            outputs.lock_folder(self.args.output_dir)
            outputs.remove_stale_temp_files(self.args.output_dir)
            model_files.write_class_indices(self.out("class_indices.json"), self.split.classes)
            if len(self.split.broken) > utils.NAMED_ONE_BY_ONE:  # the summary printed points here
                utils.write_left_out(self.out(utils.LEFT_OUT_LIST), self.split.broken)
        except BaseException as e:
            self.unmake(made, e)
        return made, self.args.output_dir

    def unmake(self, made, e):
        """Raises `e` (an OSError as a one-line UsageError) after removing the folder this run made,
        while it holds no last.pth to resume from."""
        if made and runtime.rank() == 0 and not os.path.exists(self.out("last.pth")):
            shutil.rmtree(self.args.output_dir, ignore_errors=True)
        if isinstance(e, OSError):  # not a folder, read-only, a full disk
            raise errors.UsageError(f"cannot write to the run folder {self.args.output_dir} ({e.strerror}): choose "
                                    "another with --output-dir or free some space") from None
        raise e

    def save_last(self):
        """last.pth with every process's RNG state, so that each resumes its own streams."""
        device = next(self.models.raw.parameters()).device
        rngs = runtime.gather_objects(runtime.rng_state(device))
        if runtime.rank() == 0:
            checkpoint.save_last(self.out("last.pth"), self.models.raw, self.meta, self.progress, *self.optimization,
                                 self.models.ema, rngs)
        self.saved = self.progress.epoch

    def epoch_end(self, row, result):
        """An epoch's figures (`row`, the metrics.csv line; `result`, utils.evaluate's) kept: best.pth
        when better_than_best says so, then last.pth, metrics.csv and curves.png."""
        progress, epoch = self.progress, row["epoch"]
        progress.history.append(row)
        if result["confusion"].sum() and better_than_best(result, progress):
            progress.best_top1, progress.best_epoch = result["val_top1"], epoch
            progress.best_confusion, progress.best_predictions = result["confusion"], result["predictions"]
            if runtime.rank() == 0:
                plain = self.models.raw if self.models.ema is None else self.models.ema.module
                checkpoint.save_best(self.out("best.pth"), plain, self.meta, epoch, result["val_top1"])
        progress.epoch = epoch
        if self.board is not None:  # before last.pth: a resumed run hides what was logged after it
            self.board.epoch(row)
        self.save_last()
        if runtime.rank() == 0:
            reports.write_metrics(self.out("metrics.csv"), progress.history)
            reports.plot_curves(progress.history, self.out("curves.png"), len(self.split.classes), progress.best_epoch)
            if not os.path.exists(self.out("class_distribution.png")):  # drawn here, not before the first step
                reports.plot_class_distribution(self.split, self.out("class_distribution.png"))

    def patience_ran_out(self):
        """--patience: whether the run ends here, with the line that says so printed."""
        args, progress = self.args, self.progress
        since = progress.epoch - (progress.best_epoch or 0)
        if not args.patience or since < args.patience or progress.epoch >= args.epochs:
            return False
        runtime.print0(f"stopping early after epoch {progress.epoch} of {args.epochs}: no better best.pth for "
                       f"{args.patience} epochs (--patience {args.patience}; best.pth holds epoch "
                       f"{progress.best_epoch}). To train on: {resume_command(args)} --patience {2 * args.patience}")
        return True

    def finish(self):
        """The best epoch's confusion matrix, per-class figures and mistakes, and the last word of the run."""
        args, progress, classes = self.args, self.progress, self.split.classes
        best, confusion = progress.best_top1, progress.best_confusion
        if runtime.rank() == 0 and confusion is not None:
            best_epoch = progress.best_epoch or next(r["epoch"] for r in progress.history if r["val_top1"] == best)
            reports.plot_confusion(confusion, classes, self.out("confusion_matrix.png"),
                                   f"validation, epoch {best_epoch} (best.pth): top-1 {best:.4f}")
            reports.write_per_class(self.out("per_class.csv"), confusion, classes)
            predictions = progress.best_predictions
            if predictions is not None and predictions["index"].ge(len(self.split.val_images)).any():
                # resumed from a last.pth saved before it kept the split, and the folder has changed since
                runtime.print0("note: predictions.csv and mistakes.png not written: the validation files have "
                               "changed since the best epoch", file=sys.stderr)
            elif predictions is not None:
                runtime.print0(reports.write_mistakes(args.output_dir, predictions, self.split,
                                                      f"validation, epoch {best_epoch} (best.pth)"))
        runtime.print0(f"done: best val top-1 {best:.4f}; {self.out('best.pth')}{best_reason(progress)}")
        runtime.print0(f"predict with: python predict.py IMAGES --weights {shlex.quote(self.out('best.pth'))}")
        problem = confusion is not None and reports.learning_problem(confusion, classes)
        if problem:
            runtime.print0(f"warning: the model has not learned to tell the classes apart: {problem}. Try more "
                           f"--epochs, pretrained --weights (see README), or a lower --lr (this run: {args.lr:g})",
                           file=sys.stderr)

    def stopped(self, e):
        """The exit code for exception `e`, which ended the run in its epoch saved + 1, after the line
        that says what last.pth holds and how to go on; `e` itself when it is not one a user can act on."""
        args, done = self.args, self.saved
        if isinstance(e, KeyboardInterrupt):
            return interrupted(args, done)
        if isinstance(e, errors.NonFiniteLossError):
            return failed(args, done, f"{e}; stopped", "resume with a lower --lr, --clip-grad 1 or --amp off (all "
                          f"taken on --resume): {resume_command(args)} --lr ...")
        if isinstance(e, OSError):  # a full disk, a folder that went away: the files written before are whole
            return failed(args, done, f"cannot write {e.filename or 'to ' + args.output_dir} ({e.strerror})",
                          f"free some space, then resume with: {resume_command(args)}")
        if isinstance(e, RuntimeError) and str(e).startswith("DataLoader worker"):
            # "DataLoader worker (pid 123) is killed by signal: Killed.": the out-of-memory killer, most often
            return failed(args, done, f"a data loader worker died in epoch {done + 1} "
                          f"(\"{str(e).splitlines()[0]}\"); out of memory?",
                          f"resume with fewer --workers: {resume_command(args)} --workers {args.workers // 2}")
        raise e

    def unreadable_validation(self):
        """Exit code 1 for an epoch none of whose validation images could be read; its training is kept."""
        return failed(self.args, self.saved, f"no validation image could be read in epoch {self.saved} (named above)",
                      f"check the files under {self.args.data_path}, then resume with: {resume_command(self.args)}")

    def close(self):
        if self.board is not None:
            self.board.close()


def make_run_dir(args):
    """Create the run folder, atomically: two runs started at once never share one. The default is
    weights/<model>-<dataset>, then -2, -3, ...; an earlier run is never overwritten. Returns True
    when this call created the folder."""
    if args.output_dir is None:
        base = os.path.join("weights", f"{args.model}-{os.path.basename(os.path.normpath(args.data_path))}")
        os.makedirs("weights", exist_ok=True)
        args.output_dir = outputs.new_folder(base)
        return True
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_dir)), exist_ok=True)
        os.mkdir(args.output_dir)
        return True
    except FileExistsError:
        if not os.path.isdir(args.output_dir):
            raise  # a file in the way, here or above: Saver.start says it cannot write there
        if args.exist_ok or not os.listdir(args.output_dir):
            return False
        raise errors.UsageError(f"--output-dir {args.output_dir} already holds files: pass --resume to continue "
                                "that run, --exist-ok to write into it anyway, or choose another folder") from None


# ---------------------------------------------------------------------------------------------
# Which epoch best.pth holds
# ---------------------------------------------------------------------------------------------

def best_row(progress):
    """The history row of the epoch best.pth holds, or None (no epoch yet, or a run saved before
    last.pth kept the best epoch's number)."""
    return next((r for r in progress.history if r["epoch"] == progress.best_epoch), None)


def better_than_best(result, progress):
    """Whether this epoch replaces best.pth: a higher val top-1, or the same top-1 with a lower val
    loss. A small validation set's top-1 moves in coarse steps and can stay the same for many
    epochs while the model goes on improving; the loss tells those epochs apart. Under torchrun
    every rank holds the same all-reduced figures, so all of them decide alike."""
    if result["val_top1"] < progress.best_top1:
        return False
    best = best_row(progress)
    if result["val_top1"] == progress.best_top1 and not (best and result["val_loss"] < best["val_loss"]):
        return False
    if not read_as_many(result, progress):
        runtime.print0(f"  note: top-1 {result['val_top1']:.4f} is over the {int(result['confusion'].sum())} "
                       f"validation images that could be read; best.pth (epoch {progress.best_epoch}) was "
                       "scored on more of them, so it stays", file=sys.stderr)
        return False
    return True


def read_as_many(result, progress):
    """Whether this epoch's validation read every image that the best epoch's did. Files gone or
    broken since would leave an easier, smaller set: its top-1 cannot be weighed against best.pth's."""
    best = progress.best_predictions
    if best is None or "predictions" not in result:  # no best yet, or one saved before predictions were kept
        return progress.best_confusion is None or result["confusion"].sum() >= progress.best_confusion.sum()
    return set(best["index"].tolist()) <= set(result["predictions"]["index"].tolist())


def best_reason(progress):
    """Which epoch best.pth holds and why, as the end of the run's last line."""
    best = best_row(progress)
    if best is None:
        return ""
    ties = [r for r in progress.history if r["val_top1"] == best["val_top1"]]
    if len(ties) == 1:
        return f" holds epoch {best['epoch']}, the one with that top-1"
    lowest = min(r["val_loss"] for r in ties) == best["val_loss"]
    return (f" holds epoch {best['epoch']}: {len(ties)} epochs reached that top-1, and "
            + ("its val loss was the lowest of them" if lowest else "it was the first")
            + f" ({best['val_loss']:.4f})")


# ---------------------------------------------------------------------------------------------
# How a run ends, and how to go on
# ---------------------------------------------------------------------------------------------

def nothing_left(args, progress):
    """For --resume of a run with nothing left to do (all its epochs trained, or stopped by
    --patience): the line that says so and how to go on; None when there is training to do."""
    last, done = args.resume, progress.epoch
    best = f"best.pth holds epoch {progress.best_epoch}" if progress.best_epoch else "no best.pth yet"
    if done >= args.epochs:
        return (f"{last} has finished its run: it holds epoch {done} of --epochs {args.epochs} ({best}). To "
                f"train it longer: {resume_command(args)} --epochs M, with M more than {done}")
    since = done - (progress.best_epoch or 0)
    if args.patience and since >= args.patience:
        return (f"{last} stopped early at epoch {done} of {args.epochs}: no better best.pth for {since} epochs "
                f"(--patience {args.patience}; {best}). To train on: {resume_command(args)} --patience M, with M "
                f"more than {since} (0: no early stop)")
    return None


def resume_command(args):
    world = runtime.world_size()
    launcher = "python" if world == 1 else f"torchrun --nproc_per_node={world}"
    return f"{launcher} train.py --resume {os.path.join(args.output_dir, 'last.pth')}"


def interrupted(args, done):
    """Tell how to go on after Ctrl-C or SIGTERM in epoch done + 1 (or after the last); exit code 130."""
    last = os.path.join(args.output_dir, "last.pth")
    if done >= args.epochs:  # while the last plots were drawn
        runtime.print0(f"\ninterrupted after the last epoch; {last} holds epoch {done}: the run is complete",
                       file=sys.stderr)
    else:
        holds = f"{last} holds epoch {done}" if done else "no epoch finished yet"
        runtime.print0(f"\ninterrupted in epoch {done + 1}; {holds}. Resume with:\n  {resume_command(args)}",
                       file=sys.stderr)
    return 130


def failed(args, done, error, advice):
    """One line for a run that cannot go on: what failed, what last.pth holds, what to do; exit code 1."""
    last = os.path.join(args.output_dir, "last.pth")
    holds = f"{last} holds epoch {done}" if done else f"no epoch finished yet ({last} holds the start)"
    runtime.print0(f"error: {error}. {holds}; {advice}", file=sys.stderr)
    return 1
