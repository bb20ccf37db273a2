"""Exit codes of the command-line entry points (documented in README and `--help`).

This module imports nothing, so the launcher and `--help` can use it without
loading TensorFlow.
"""

OK = 0
#: A bad flag, config, data directory or checkpoint: one `error:` line on stderr.
USAGE = 2
#: SIGTERM (preemption): every worker saved a checkpoint at the same step and exited;
#: run the same command again to resume there. Same value as TF's default for
#: `PreemptionCheckpointHandler` outside Google Cloud.
PREEMPTED = 42
#: `python -m deepseek_tf.launch --timeout=S` ran out of time; all workers were killed.
TIMEOUT = 124
#: Ctrl-C: the launcher killed all workers.
INTERRUPTED = 130

HELP = (f"Exit codes: {OK} done; {USAGE} bad input (one 'error:' line); {PREEMPTED} "
        f"preempted (SIGTERM): a checkpoint was saved, run the same command again to "
        f"resume; launcher only: {TIMEOUT} timeout, {INTERRUPTED} Ctrl-C; any other code is "
        f"a worker's failure.")
