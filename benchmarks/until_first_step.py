"""Runs a script as `python SCRIPT ARGS` does and ends its process the moment its first optimizer
step is done: --startup measures launch to that step, for train.py and the plain start alike,
and a run to the end of an epoch would measure the epoch instead.

    python benchmarks/until_first_step.py SCRIPT [ARGS ...]
"""
import os
import runpy
import sys

from torch.optim.optimizer import register_optimizer_step_post_hook

# os._exit: no exit handlers, no waiting for loader workers (on_pty ends them with the group)
register_optimizer_step_post_hook(lambda *a: os._exit(0))
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))  # the script's folder, as `python SCRIPT` has it
runpy.run_path(sys.argv[0], run_name="__main__")
