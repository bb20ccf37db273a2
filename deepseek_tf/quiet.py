"""TensorFlow's log noise off for the command-line entry points (a leaf module).

TensorFlow prints a start-up block (cuInit, oneDNN, cpu_feature_guard) through its own
C++ log, which `TF_CPP_MIN_LOG_LEVEL` silences only if set before TensorFlow loads, and
grappler / XLA lines (`W0000 ... op_level_cost_estimator ... Error in PredictCost()`,
`I0000 ... Compiled cluster using XLA!`) through absl's log, which ignores that variable.
`quiet_tensorflow()` handles both; every `python -m deepseek_tf.<tool>` and tools/*.py
calls it before anything imports TensorFlow. `quiet_stderr()` hides what a C++ library
writes to file descriptor 2 for the length of a call (the TFLite converter's chatter),
and shows it if the call fails.

Example:
    >>> quiet_tensorflow()   # first thing in an entry point
    >>> with quiet_stderr():
    ...     data = converter.convert()
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import sys
import tempfile

#: absl::SetMinLogLevel(absl::LogSeverityAtLeast) as exported by TF 2.20's framework library.
_ABSL_SET_MIN_LOG_LEVEL = "_ZN4absl12lts_2025012714SetMinLogLevelENS0_18LogSeverityAtLeastE"


def quiet_tensorflow(level: str = "3") -> None:
    """Sets `TF_CPP_MIN_LOG_LEVEL` (unless the user set it) and gives absl's log the same
    minimum level (0 info, 1 warning, 2 error, 3 fatal). Call before TensorFlow's first
    import; without a TF framework library nothing but the variable changes."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", level)
    try:
        value = min(max(int(os.environ["TF_CPP_MIN_LOG_LEVEL"]), 0), 3)
        spec = importlib.util.find_spec("tensorflow")
        path = os.path.join(spec.submodule_search_locations[0], "libtensorflow_framework.so.2")
        if os.path.exists(path):
            setter = getattr(ctypes.CDLL(path), _ABSL_SET_MIN_LOG_LEVEL, None)
            if setter is not None:
                setter(ctypes.c_int(value))
    except (ValueError, OSError, AttributeError, TypeError):
        pass  # another TF build: only the variable applies


@contextlib.contextmanager
def quiet_stderr():
    """Sends file descriptor 2 to a temporary file for the block; if the block raises,
    the captured text is written back to stderr before the exception propagates."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode("utf-8", "replace"))
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
