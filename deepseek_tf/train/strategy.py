"""The distribution strategy of a run, what this worker is, and how batches reach replicas.

`--train.strategy=auto` picks, in order: `MultiWorkerMirroredStrategy` when
`TF_CONFIG` is set (one process per worker, see `deepseek_tf.launch`),
`MirroredStrategy` when several GPUs are visible, else the default strategy
(one device). Collectives get a timeout (`--train.collective_timeout`), so a
worker whose peer died fails instead of waiting forever.

Input: every worker builds its own tf.data pipeline over its share of the
shards (an `InputContext` with one input pipeline per worker) and iterates it
with a plain tf.data iterator, which a checkpoint can save; each step hands the
worker's local replicas consecutive batches (`next_batch`). tf.distribute's own
distributed iterators cannot be checkpointed, so a resumed run could not
continue with exactly the next batch.

Example:
    >>> strategy = make_strategy(TrainConfig(strategy="auto"))
    >>> role = cluster_role()           # from TF_CONFIG; no TensorFlow needed
    >>> role.is_chief, role.num_workers
    (True, 1)
"""

from __future__ import annotations

import dataclasses
import json
import os

from deepseek_tf.config import TrainConfig
from deepseek_tf.errors import UserError


@dataclasses.dataclass(frozen=True)
class Role:
    """This process's place in the cluster."""

    task_type: str = "worker"
    task_id: int = 0
    num_workers: int = 1
    has_chief_job: bool = False  # TF_CONFIG names a 'chief'; else worker 0 is the chief

    @property
    def is_chief(self) -> bool:
        """The chief writes config, logs, summaries, plots and the real checkpoints."""
        if self.has_chief_job:
            return self.task_type == "chief"
        return self.task_id == 0

    @property
    def index(self) -> int:
        """0..num_workers-1: the chief (if any) first, then the workers."""
        return self.task_id + int(self.has_chief_job and self.task_type == "worker")

    @property
    def name(self) -> str:
        return f"{self.task_type} {self.task_id}"


def read_tf_config(environ=os.environ) -> dict | None:
    """The parsed `TF_CONFIG`, or None if unset; a malformed one is a UserError."""
    raw = environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        tf_config = json.loads(raw)
        cluster, task = tf_config["cluster"], tf_config["task"]
        task_type, task_id = task["type"], int(task["index"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"TF_CONFIG is not valid ({e}); expected "
                        '{"cluster": {"worker": ["host:port", ...]}, '
                        '"task": {"type": "worker", "index": 0}}.') from e
    unsupported = sorted(set(cluster) - {"chief", "worker"})
    if unsupported or task_type not in ("chief", "worker"):
        raise UserError(f"TF_CONFIG has job(s) {unsupported or [task_type]}; training uses "
                        f"MultiWorkerMirroredStrategy, whose cluster has only 'chief' and "
                        f"'worker' jobs.")
    if not 0 <= task_id < len(cluster.get(task_type, [])):
        raise UserError(f"TF_CONFIG task {task_type} {task_id} is not in its cluster "
                        f"{cluster}.")
    return tf_config


def cluster_role(environ=os.environ) -> Role:
    """This process's role from `TF_CONFIG` (one worker, the chief, if unset)."""
    tf_config = read_tf_config(environ)
    if tf_config is None:
        return Role()
    cluster, task = tf_config["cluster"], tf_config["task"]
    return Role(task["type"], int(task["index"]),
                len(cluster.get("chief", [])) + len(cluster.get("worker", [])),
                has_chief_job=bool(cluster.get("chief")))


def strategy_name(cfg: TrainConfig, environ=os.environ) -> str:
    """The strategy `cfg.strategy` resolves to: default, mirrored or multi_worker."""
    if cfg.strategy != "auto":
        return cfg.strategy
    if read_tf_config(environ) is not None:
        return "multi_worker"
    import tensorflow as tf

    return "mirrored" if len(tf.config.list_logical_devices("GPU")) > 1 else "default"


_MIRRORED: dict = {}


def configure_gpus(memory_growth: bool) -> None:
    """Memory growth on every GPU (TF then allocates as needed instead of grabbing all
    GPU memory up front, so several processes can share a GPU). A no-op without GPUs,
    or once the GPUs are initialized (TF fixes the setting at that point)."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, memory_growth)
        except RuntimeError:  # already initialized in this process
            pass


def make_strategy(cfg: TrainConfig):
    """The `tf.distribute.Strategy` of a run (create it before other TF work).

    One MirroredStrategy per device set and process: a second instance would reuse the
    first one's collective instance keys, and its all-reduces would meet the first
    one's cached shapes ("Shape mismatch in the collective instance").
    """
    import tensorflow as tf

    configure_gpus(cfg.gpu_memory_growth)  # before anything initializes the GPUs
    name = strategy_name(cfg)
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        key = tuple(d.name for d in devices)
        if key not in _MIRRORED:
            _MIRRORED[key] = tf.distribute.MirroredStrategy(list(key))
        return _MIRRORED[key]
    options = tf.distribute.experimental.CommunicationOptions(
        timeout_seconds=cfg.collective_timeout or None)
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


def is_multi_worker(strategy) -> bool:
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def input_context(strategy, role: Role):
    """The `tf.distribute.InputContext` of this worker's input pipeline."""
    import tensorflow as tf

    return tf.distribute.InputContext(num_input_pipelines=role.num_workers,
                                      input_pipeline_id=role.index,
                                      num_replicas_in_sync=strategy.num_replicas_in_sync)


def next_batch(strategy, iterator):
    """The next batch of every local replica (consecutive elements of `iterator`).

    Call inside the `tf.function` that runs `strategy.run`.
    """
    return strategy.experimental_distribute_values_from_function(lambda _: next(iterator))


class Collectives:
    """Host-side collectives between workers: a barrier and an agreement check.

    With one worker (default or MirroredStrategy) both are no-ops: there is nobody
    to wait for or disagree with (and several MirroredStrategy objects in one process
    would collide on collective instance keys).
    """

    def __init__(self, strategy):
        import tensorflow as tf

        self.active = is_multi_worker(strategy)

        @tf.function(autograph=False)
        def _gather(value):  # every replica's int64 `value`, as a (replicas,) vector
            def fn():
                ctx = tf.distribute.get_replica_context()
                return ctx.all_gather(tf.reshape(value, [1]), axis=0)

            return strategy.experimental_local_results(strategy.run(fn))[0]

        self._gather = _gather

    def barrier(self) -> None:
        """Returns when every worker has reached it."""
        import tensorflow as tf

        if self.active:
            self._gather(tf.constant(0, tf.int64)).numpy()

    def chief_value(self, value: int) -> int:
        """The chief's `value` on every worker (`value` itself with one worker)."""
        import tensorflow as tf

        if not self.active:
            return value
        return int(self._gather(tf.constant(value, tf.int64)).numpy()[0])

    def gather(self, value: int) -> list[int]:
        """Every worker's `value`, in the order of the collectives' ranks (`[value]`
        with one worker)."""
        import tensorflow as tf

        if not self.active:
            return [value]
        return [int(v) for v in self._gather(tf.constant(value, tf.int64)).numpy()]

    def check_same(self, value: int, what: str) -> None:
        """Raises UserError unless every worker passes the same `value`."""
        import tensorflow as tf

        if not self.active:
            return
        values = sorted(set(self.gather(value)))
        if len(values) > 1:
            raise UserError(f"workers disagree on the {what} ({values}): every worker must "
                            f"see the same --workdir (a shared filesystem) and the same flags.")
