"""What a training run will cost, said before it has run for long: the time per epoch and for
the whole run and the peak memory, from its first step (a real one, timed: the run's results
do not change), and on a CPU which preset fits.

Plain Python (no torch): ``train.train_epoch`` measures, this module words it.
"""

from __future__ import annotations

# a run longer than this on a CPU: say which preset fits
CPU_RUN_HOURS = 2.0


def duration(seconds: float) -> str:
    """A span for people: "0.4 s", "45 s", "12 min", "1 h 51 min", "5 d 17 h"."""
    if seconds < 9.95:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 60:
        return f"{minutes:.0f} min"
    hours, minutes = divmod(round(minutes), 60)
    if hours < 24:
        return f"{hours} h {minutes} min"
    days, hours = divmod(hours + round(minutes / 60), 24)
    return f"{days} d {hours} h"


def first_step_estimate(step_s: float, steps_per_epoch: int, steps_left: int, epochs_left: int,
                        memory_mib: float, memory_what: str, device_type: str,
                        preset: str) -> str:
    """The estimate printed after a run's first step (``step_s`` seconds, start-up included,
    so an upper bound): per epoch, for the ``steps_left`` steps of at most ``epochs_left``
    epochs, the peak memory, and on a CPU where the run would take longer than
    ``CPU_RUN_HOURS``, the preset that fits."""
    epoch_s, run_s = step_s * steps_per_epoch, step_s * steps_left
    lines = [f"first step: {duration(step_s)} (start-up included): about {duration(epoch_s)} "
             f"per epoch of {steps_per_epoch} steps, about {duration(run_s)} for "
             f"the {epochs_left} epoch(s) left at most (the lr schedule may stop sooner; "
             f"validation not counted); peak {memory_what} {memory_mib / 1024:.1f} GiB"]
    if device_type == "cpu" and run_s > 3600 * CPU_RUN_HOURS:
        if preset == "paper":
            lines.append("  the paper's size is meant for GPUs: on a CPU, `--preset reduced` "
                         "(64-pixel crops, width 1/8, the same recipe) fits (`make demo` trains "
                         "it in minutes on the built-in data); Ctrl-C stops this run, `vggnet "
                         "train --resume` continues it")
        else:
            lines.append(f"  even the {preset} preset would take over {CPU_RUN_HOURS:g} h on this "
                         "CPU: train on fewer images or for fewer --epochs, or on a GPU")
    return "\n".join(lines)
