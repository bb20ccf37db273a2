"""List a checkpoint's variables: name, shape, dtype, size (and value statistics).

    python -m deepseek_tf.tools.inspect_checkpoint --checkpoint=runs/tiny
    python -m deepseek_tf.tools.inspect_checkpoint --checkpoint=runs/tiny/checkpoints/ckpt-400 \
        --filter=lora --stats

--checkpoint takes a workdir (its latest checkpoint), a checkpoints/ directory or a
checkpoint prefix. Each variable is named by its place in the model (TF itself files a
trainable variable under the optimizer's shorter path), grouped by the top-level object
(model, optimizer, step, ...); with --stats each row adds mean, std and max |x|. Ends
with the counts.
"""

import os

from deepseek_tf.quiet import quiet_tensorflow  # noqa: E402

quiet_tensorflow()  # TF start-up and grappler/XLA log noise off (README)

from absl import flags  # noqa: E402

from deepseek_tf import flags as dflags  # noqa: E402
from deepseek_tf.errors import UserError  # noqa: E402


SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"


def define_flags():
    """The command line's flags (defined only when run as a command)."""
    flags.DEFINE_string("checkpoint", "", "A workdir, a checkpoints/ directory or a checkpoint "
                        "prefix.")
    flags.DEFINE_string("filter", "", "Only variables whose name contains this text.")
    flags.DEFINE_bool("stats", False, "Also print mean, std and max |x| of each variable.")


def resolve(path: str) -> str:
    """The checkpoint prefix that `path` (workdir, directory or prefix) names."""
    import tensorflow as tf

    from deepseek_tf.errors import UserError
    for d in (os.path.join(path, "checkpoints"), path):
        if os.path.isdir(d):
            latest = tf.train.latest_checkpoint(d)
            if latest:
                return latest
    if tf.io.gfile.exists(path + ".index"):
        return path
    raise UserError(f"--checkpoint={path}: no checkpoint there (give a workdir, its "
                    f"checkpoints/ directory or a prefix like .../ckpt-400).")


def object_paths(reader) -> dict[str, str]:
    """{checkpoint key: readable path}. TF stores each variable once, under its shortest
    path (a trainable variable under `optimizer/_trainable_variables/<i>`); this walks the
    object graph from `model` first, so variables get their path in the model."""
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    roots = sorted(graph.nodes[0].children, key=lambda c: c.local_name != "model")
    seen, out = {0}, {}
    for root in roots:  # the whole model subtree before the optimizer's references
        queue = [(root.node_id, root.local_name)]
        while queue:
            node_id, path = queue.pop(0)
            if node_id in seen:
                continue
            seen.add(node_id)
            node = graph.nodes[node_id]
            for attr in node.attributes:
                out.setdefault(attr.checkpoint_key, path)
            queue += [(c.node_id, f"{path}/{c.local_name}") for c in node.children]
    return out


def inspect(path: str, contains: str = "", stats: bool = False) -> list[dict]:
    """One dict per variable: name, shape, dtype, size (+ mean, std, max_abs)."""
    import numpy as np
    import tensorflow as tf

    prefix = resolve(path)
    reader = tf.train.load_checkpoint(prefix)
    dtypes = reader.get_variable_to_dtype_map()
    names = object_paths(reader)
    rows = []
    for key, shape in sorted(reader.get_variable_to_shape_map().items(),
                             key=lambda kv: names.get(kv[0], kv[0])):
        name = names.get(key, key[:-len(SUFFIX)])
        if not key.endswith(SUFFIX) or contains not in name:
            continue  # skips the object graph and iterator state
        row = {"name": name, "shape": list(shape),
               "dtype": dtypes[key].name, "size": int(np.prod(shape)) if shape else 1}
        if stats and dtypes[key].is_floating:
            v = reader.get_tensor(key).astype(np.float64)
            row.update(mean=float(v.mean()), std=float(v.std()), max_abs=float(abs(v).max()))
        rows.append(row)
    return rows


def main(argv):
    F = flags.FLAGS
    rows = inspect(F.checkpoint, F.filter, F.stats)
    print(f"checkpoint: {resolve(F.checkpoint)}")
    width = max([len(r["name"]) for r in rows] + [8])
    for r in rows:
        shape = str(tuple(r["shape"]))
        line = f"{r['name']:<{width}}  {shape:<16} {r['dtype']:<8} {r['size']:>12,}"
        if "mean" in r:
            line += f"  mean {r['mean']:+.4e} std {r['std']:.4e} max|x| {r['max_abs']:.4e}"
        print(line)
    groups = {}
    for r in rows:
        top = r["name"].split("/", 1)[0]
        groups[top] = groups.get(top, 0) + r["size"]
    print(f"{len(rows)} variables; " + ", ".join(f"{k}: {v:,} values" for k, v in groups.items()))


def entry():
    """The console script `deepseek-tf-inspect-checkpoint`."""
    define_flags()
    dflags.run(main, required=("checkpoint",))


if __name__ == "__main__":
    entry()
