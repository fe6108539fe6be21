"""benchmark.py's modes and the programs they are timed against, a file each.

The modes, which benchmark.py imports and runs by its flags:

    steps.py             (no flag) a training step, inference, a folder of JPEGs and the loader,
                         each contender in a process of its own; speed and memory
    whole.py             --whole: train.py and predict.py from launch to exit against plain scripts
    startup.py           --startup: launch to the first training step on folders of many files
    time_to_accuracy.py  --time-to-accuracy: launch to a val top-1, train.py against the tutorial
    loader.py            --loader: the data pipelines alone, images per second per core
    quick.py             --device cuda --quick: what a GPU does with this repo, in a few minutes
    measuring.py         what they share: the table every mode prints, the median, commands timed
                         on a pseudo-terminal, the photos they read, the process's memory

The peer programs: each is another project's way of doing what one of this repo's scripts does,
run as a process of its own, as its users run it. They import nothing from this repo: they stand
for code that knows nothing of it, so nothing of this repo's may speed them up or slow them down.

    tutorial_train.py        the tutorial's training program (train.py's baseline)
    plain_start.py           torchvision's plain start: ImageFolder, random_split, one step
    plain_predict_folder.py  a plain loop over a folder of images (predict.py's baseline)
    plain_predict_one.py     the six lines that predict one image
    until_first_step.py      not a peer: runs one of the above, or train.py, and ends it at its
                             first optimizer step, where --startup's clock stops
"""
