"""A stand-in for `python -m deepseek_tf.train` in launcher tests (no TensorFlow).

    python -m tests.helpers.fake_worker <fail_index> <fail_code>

Prints its TF_CONFIG task index and the pid of a child it starts (`sleep`), then
worker `fail_index` exits with `fail_code` and the others sleep. SIGTERM makes a
worker exit with 42, like a preempted trainer.
"""

import json
import os
import signal
import subprocess
import sys
import time

if __name__ == "__main__":
    fail_index, fail_code = int(sys.argv[1]), int(sys.argv[2])
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    child = subprocess.Popen(["sleep", "600"])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(42))
    print(f"index {index} child {child.pid}", flush=True)
    if index == fail_index:
        time.sleep(0.5)
        sys.exit(fail_code)
    time.sleep(600)
