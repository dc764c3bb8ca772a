"""Test helper: run ``train.main`` once per argument list, in order, in this one process.

    [torchrun ...] python tests/train_many.py RUNS.json

RUNS.json holds a list of argv lists. One launch then serves several runs, so the test pays
python's, torch's and timm's start (and torchrun's rendezvous) once instead of once per run;
each run still builds, trains and writes its own folder from scratch (its seed, its model,
its train.log). Stops at the first run that does not exit 0, with that status.

Under torchrun the runs share one process group: the first run starts it and it is destroyed
after the last. (A default group destroyed and started again inside one torchrun launch
rendezvouses under the same store keys as the first and hangs in gloo's connect.)
"""
import json
import os
import sys

import torch.distributed as torch_dist

sys.path.insert(0, os.environ["REPO"])
import train  # noqa: E402
from emakit.training.lifecycle import end_process  # noqa: E402

if __name__ == "__main__":
    destroy = torch_dist.destroy_process_group
    torch_dist.destroy_process_group = lambda group=None: None  # kept for the next run
    code = 0
    try:
        with open(sys.argv[1]) as f:
            for argv in json.load(f):
                code = train.main(argv)
                if code != 0:
                    print(f"train_many.py: run {argv} exited {code}", file=sys.stderr)
                    break
    finally:
        if torch_dist.is_initialized():
            destroy()
    end_process(code)  # as train.py ends (a torchrun rank: no teardown, see lifecycle.end_process)
