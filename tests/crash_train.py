"""A training run for tests/test_crash_safety.py to kill: TinyNet, a checkpoint every 2 steps,
24 optimizer steps slowed to about 25 ms each so that kills land all over the run.

    python tests/crash_train.py OUTPUT_DIR FLAT_METHOD [random | in_state_write | after_state]

Prints "TRAINING" when training begins. `in_state_write` kills itself after the flat state's
temporary file is written but before its rename; `after_state` after the flat state file is in
place but before the Trainer writes the rest of the checkpoint (both at the second checkpoint).
"""

import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from helpers import TinyData, TinyNet, sgd_args  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402

import hf_flat.state_file  # noqa: E402
import hf_flat.trainer  # noqa: E402
from hf_flat import FlatTrainer  # noqa: E402

#: flat_method -> its settings, so that every part of the state matters (used by the test too)
SETTINGS = {
    "wasam": dict(average_start=0.25, average_freq=1),
    "saf": dict(saf_start_epoch=1, saf_past_epochs=1),
    "mesa": dict(mesa_start_epoch=1, mesa_decay=0.5),
}


def training_args(output_dir, method):
    return sgd_args(output_dir, flat_method=method, num_train_epochs=6, save_strategy="steps", save_steps=2,
                    **SETTINGS[method])


class Slow(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        print("TRAINING", flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(0.025)


def kill_at_second_save(module, name, before):
    """Wrap `module.name` so that its second call kills this process (before or after the call)."""
    original, calls = getattr(module, name), []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2 and before:
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(module, name, wrapped)


def main(output_dir, method, mode="random"):
    if mode == "in_state_write":  # the temporary file is complete, the rename never happens
        kill_at_second_save(hf_flat.state_file.os, "replace", before=True)
    elif mode == "after_state":  # the flat state is in place, the Trainer's files are not
        kill_at_second_save(Trainer, "_save_checkpoint", before=True)
    trainer = FlatTrainer(model=TinyNet(), args=training_args(output_dir, method), train_dataset=TinyData(),
                          callbacks=[Slow()])
    trainer.train()


if __name__ == "__main__":
    main(*sys.argv[1:])
