"""Raw corpus -> cleaned, deduplicated, tokenized, sharded TFRecords + metadata.json.

Three resumable phases, all under `data_dir`:

  1. stage     read inputs (ingest.py) -> parse / clean / filter (clean.py) ->
               exact + near dedup (dedup.py) -> perplexity filter (optional: a
               workdir's model scores the documents in batches) ->
               `.stage/docs.jsonl`, in input order
  2. tokenizer build, load or train it (on the staged text); saved in data_dir
  3. shards    split by document name, tokenize (SFT: render the chat template
               with its loss mask), write atomic shards; `.stage/progress.json`
               records every finished shard

A re-run with the same settings after an interruption reuses the staged
documents and the tokenizer and skips finished shards (their documents are not
tokenized again); a finished directory is a no-op; other settings are refused.
metadata.json and report.json are written last, then `.stage/` is removed.

Example:
    >>> meta = prepare(DataConfig(max_samples=20), "/tmp/stdlib-data")
    >>> meta["splits"]["train"]["documents"] > 0
    True
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m deepseek_tf.data.prepare`: before TensorFlow loads
    raise SystemExit("deepseek_tf.data.prepare is a library module; the command is "
                     "`python -m deepseek_tf.prepare` (--help lists its flags).")

import array
import collections
import glob
import hashlib
import json
import os
import shutil
import sys
import time

import numpy as np

from deepseek_tf.atomic import atomic_write
from deepseek_tf.config import DataConfig, TokenizerConfig
from deepseek_tf.data import corpus as corpus_lib
from deepseek_tf.data import ingest, stages
from deepseek_tf.data import shards as shards_lib
from deepseek_tf.data.dedup import ExactDedup, NearDedup
from deepseek_tf.data.parallel import chunked, ordered_map
from deepseek_tf.data.report import Report
from deepseek_tf.data.templates import TEMPLATES
from deepseek_tf.data.tokenizer import TOKENIZER_FILE, build_tokenizer, load_tokenizer
from deepseek_tf.errors import UserError

STAGE_DIR = ".stage"
REPORT_FILE = "report.json"
CHUNK = 256


def _sources(cfg: DataConfig):
    if cfg.input_list:
        sources = ingest.find_sources(cfg.input_list, tuple(
            e.strip().lower() for e in cfg.text_extensions.split(",") if e.strip()))
        return sources, {"name": "inputs", "inputs": list(cfg.input_list),
                         "files": len(sources)}
    root = corpus_lib.stdlib_root()
    files = corpus_lib.stdlib_files(root)
    if not files:
        raise UserError(f"no .py files found under {root}; the embedded corpus needs the "
                        f"Python standard library sources.")
    sources = [ingest.Source(os.path.join(root, rel), rel.replace(os.sep, "/"), "plain")
               for rel in files]
    return sources, {"name": "stdlib", "root": root, "python": sys.version.split()[0]}


def _settings(cfg: DataConfig, tcfg: TokenizerConfig, sources, corpus_info) -> dict:
    return {"corpus": corpus_info, "inputs": ingest.fingerprint_entries(sources),
            "data": cfg.prepared_settings(), "tokenizer": tcfg.to_dict()}


def split_key(name: str) -> int:
    """The split order of a document: the first 8 bytes of sha256(name)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")


def val_threshold(keys, val_size: float) -> int:
    """Documents with split_key <= this go to validation (-1: none); matches
    corpus.validation_names (the n smallest name hashes)."""
    n_docs = len(keys)
    n = int(val_size) if val_size >= 1 else int(round(val_size * n_docs))
    if val_size > 0 and n == 0 and n_docs > 1:
        n = 1
    n = min(n, max(n_docs - 1, 0))
    if n == 0:
        return -1
    arr = np.frombuffer(keys, dtype=np.uint64) if isinstance(keys, array.array) else \
        np.asarray(keys, np.uint64)
    return int(np.partition(arr, n - 1)[n - 1])


class _Progress:
    """`.stage/progress.json`: settings fingerprint, stage results, finished shards."""

    def __init__(self, data_dir: str, fingerprint: str):
        self.dir = os.path.join(data_dir, STAGE_DIR)
        self.path = os.path.join(self.dir, "progress.json")
        self.docs_path = os.path.join(self.dir, "docs.jsonl")
        self.state = {"fingerprint": fingerprint, "shards": {s: [] for s in shards_lib.SPLITS}}
        if os.path.exists(self.path):
            with open(self.path) as f:
                saved = json.load(f)
            if saved.get("fingerprint") != fingerprint:
                raise UserError(f"{data_dir} holds an interrupted prepare with other settings; "
                                f"remove that directory or choose another --data.output_dir.")
            self.state = saved
        os.makedirs(self.dir, exist_ok=True)

    def __getitem__(self, key):
        return self.state.get(key)

    def update(self, **items) -> None:
        self.state.update(items)
        atomic_write(self.path, json.dumps(self.state))

    def set_shards(self, split: str, infos: list[dict]) -> None:
        self.update(shards={**self.state["shards"], split: list(infos)})


def _bar(progress: bool, total=None, unit="doc", desc=""):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=desc, disable=not progress, file=sys.stderr,
                mininterval=1.0, dynamic_ncols=True, smoothing=0.1)


def _stage(cfg: DataConfig, sources, prog: _Progress, progress: bool, data_dir: str,
           scorer=None) -> dict:
    """Phase 1: read, clean, filter, dedup (, perplexity filter) -> docs.jsonl. Returns
    the stage state."""
    report = Report()
    report.counts.update({"documents_in": 0, "normalized": 0, "replaced": 0})
    exact = ExactDedup() if cfg.dedup_exact else None
    near = NearDedup(cfg.dedup_threshold, cfg.dedup_num_perm, cfg.dedup_ngram) \
        if cfg.dedup_threshold > 0 else None
    report.info["near_dedup"] = None if near is None else {
        "threshold": cfg.dedup_threshold, "num_perm": cfg.dedup_num_perm,
        "ngram": cfg.dedup_ngram, "bands": near.bands, "rows": near.rows}
    if scorer is not None:
        report.info["ppl_filter"] = {"model": cfg.ppl_filter_model, "max": cfg.ppl_max}
    keys = array.array("Q")
    kept: list[dict] = []  # documents past dedup, waiting for the perplexity filter

    def flush(out):
        ppls = scorer([stages.training_text(d, cfg) for d in kept]) if scorer else kept
        for doc, ppl in zip(kept, ppls):
            if scorer and not ppl <= cfg.ppl_max:  # NaN too
                report.remove("perplexity")
                continue
            out.write(json.dumps(doc, ensure_ascii=False) + "\n")
            keys.append(split_key(doc["n"]))
        kept.clear()

    tmp = prog.docs_path + ".tmp"
    items = ingest.read_sources(sources, cfg.max_samples)
    results = ordered_map(stages.clean_chunk, chunked(items, CHUNK), cfg.num_proc,
                          stages.init_clean, (cfg,))
    with open(tmp, "w", encoding="utf-8") as out, _bar(progress, desc="clean") as bar:
        for chunk in results:
            bar.update(len(chunk))
            for r in chunk:
                if r[0] == "bad":
                    if cfg.on_error == "fail":
                        raise UserError(f"{r[1]}: {r[3]} (--data.on_error=fail; use "
                                        f"--data.on_error=skip to count and skip such input).")
                    report.bad(r[1], r[2], r[3])
                    continue
                report.counts["documents_in"] += 1
                report.counts.update(r[-1])  # normalized / replaced
                if r[0] == "drop":
                    report.remove(r[1])
                elif exact is not None and exact.add_key(r[2]):
                    report.remove("exact_duplicate")
                elif near is not None and near.add_signature(r[3]):
                    report.remove("near_duplicate")
                else:
                    kept.append(r[1])
            if len(kept) >= CHUNK or not scorer:
                flush(out)
        flush(out)
    os.replace(tmp, prog.docs_path)
    stage = {"documents": len(keys), "val_threshold": val_threshold(keys, cfg.val_size),
             "report": report.to_dict()}
    if not keys:
        _write_json(os.path.join(data_dir, REPORT_FILE), stage["report"])
        lines = "; ".join(line.strip() for line in report.lines()[:3])
        raise UserError(f"no documents left to prepare ({lines}); see "
                        f"{os.path.join(data_dir, REPORT_FILE)}.")
    prog.update(stage=stage)
    return stage


def _staged(prog: _Progress):
    with open(prog.docs_path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def _tokenizer(cfg: DataConfig, tcfg: TokenizerConfig, data_dir: str, prog: _Progress, log):
    """Phase 2: the tokenizer, saved in data_dir (reused on resume)."""
    if prog["tokenizer"] and os.path.exists(os.path.join(data_dir, TOKENIZER_FILE)):
        tok = load_tokenizer(data_dir)
        if tok.fingerprint == prog["tokenizer"]:
            return tok
    texts = (stages.training_text(d, cfg) for d in _staged(prog))
    markers = TEMPLATES[cfg.template].markers if cfg.is_sft else ()
    tok = build_tokenizer(tcfg, texts, markers, cfg.num_proc, log=log)
    tok.save(data_dir)
    prog.update(tokenizer=tok.fingerprint)
    return tok


def _shards(cfg: DataConfig, tok, data_dir: str, prog: _Progress, progress: bool):
    """Phase 3: split, tokenize, write shards; skips the documents of finished shards."""
    for stale in glob.glob(os.path.join(data_dir, ".*.tfrecord.tmp-*")):
        os.remove(stale)
    dtype = shards_lib.token_dtype_for(tok.vocab_size)
    shard_bytes = int(cfg.shard_size_mb * 1e6)
    writers, skip = {}, {}
    for split in shards_lib.SPLITS:
        done = prog["shards"][split]
        for info in done:
            path = os.path.join(data_dir, info["file"])
            if not os.path.exists(path) or os.path.getsize(path) != info["bytes"]:
                raise UserError(f"{path}, finished by the interrupted prepare, is missing or "
                                f"changed; remove {data_dir} and prepare again.")
        writers[split] = shards_lib.ShardWriter(
            data_dir, split, shard_bytes, dtype, done=done,
            on_shard=lambda infos, s=split: prog.set_shards(s, infos))
        skip[split] = sum(i["stats"].get("consumed", 0) for i in done)
    threshold = prog["stage"]["val_threshold"]
    todo = prog["stage"]["documents"] - sum(skip.values())

    def pending():
        for doc in _staged(prog):
            split = "validation" if split_key(doc["n"]) <= threshold else "train"
            if skip[split]:
                skip[split] -= 1
                continue
            yield split, doc

    results = ordered_map(stages.encode_split_chunk, chunked(pending(), CHUNK), cfg.num_proc,
                          stages.init_encode, (data_dir, cfg))
    with _bar(progress, total=todo, desc="tokenize") as bar:
        t0, tokens = time.time(), 0
        for chunk in results:
            for split, enc in chunk:
                w = writers[split]
                w.count("consumed")
                if enc is None:
                    w.count("no_target")
                    continue
                ids, mask, info = enc
                if info:
                    w.count("turns_dropped", info["turns_dropped"] > 0)
                    w.count("cut", info["cut"] > 0)
                    w.count("target_tokens", int(mask[1:].sum()))
                w.add(ids, mask)
                tokens += len(ids)
            bar.update(len(chunk))
            bar.set_postfix_str(f"{tokens / max(time.time() - t0, 1e-9):,.0f} tok/s",
                                refresh=False)
    return {split: (w.close(), w.leftover) for split, w in writers.items()}


def _write_json(path: str, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True))


def _summarize(written: dict, report: Report, cfg: DataConfig) -> dict:
    splits, totals = {}, {}
    for split, (infos, leftover) in written.items():
        stats = [i["stats"] for i in infos] + [leftover]
        for st in stats:
            for k, v in st.items():
                totals[k] = totals.get(k, 0) + v
        splits[split] = {"documents": sum(i["documents"] for i in infos),
                         "tokens": sum(i["tokens"] for i in infos), "shards": infos,
                         "length_histogram": shards_lib.merge_histograms(
                             [i["length_histogram"] for i in infos])}
        if cfg.is_sft:
            splits[split]["target_tokens"] = sum(i["stats"].get("target_tokens", 0)
                                                 for i in infos)
    report.remove("no_target", totals.get("no_target", 0))
    report.counts["documents_out"] = sum(s["documents"] for s in splits.values())
    report.counts["tokens_out"] = sum(s["tokens"] for s in splits.values())
    if cfg.is_sft:
        report.counts["target_tokens_out"] = totals.get("target_tokens", 0)
        report.info["truncated"] = {"turns_dropped": totals.get("turns_dropped", 0),
                                    "cut": totals.get("cut", 0)}
    report.info["splits"] = {s: {"documents": v["documents"], "tokens": v["tokens"]}
                             for s, v in splits.items()}
    return splits


def _why_no_training(prog: _Progress) -> str:
    """Why the hash split sent every document to validation, with the fix."""
    names = collections.Counter(doc["n"] for doc in _staged(prog))
    total = sum(names.values())
    (name, count), = names.most_common(1) or [("", 0)]
    if count == total and total > 1:
        return (f"all {total} records share one name ({name}), and the split goes by name; "
                f"give them their own names (e.g. one JSON object per line)")
    if count > 1:
        return (f"{count} of {total} records share one name ({name}) and fell to "
                f"validation together; lower --data.val_size or name records apart")
    return "lower --data.val_size or add documents"


def prepare(cfg: DataConfig, data_dir: str, tokenizer_cfg: TokenizerConfig | None = None,
            log=print, progress: bool | None = None, scorer=None) -> dict:
    """Prepares the configured corpus into `data_dir` and returns its metadata.

    Args:
      cfg: the data config (sources, cleaning, SFT, split, shard size).
      data_dir: output directory.
      tokenizer_cfg: which tokenizer to build or train (default: byte).
      log: printer for progress lines and the report.
      progress: show progress bars on stderr (default: when stderr is a terminal).
      scorer: with `cfg.ppl_filter_model`, `texts -> perplexities` of that model
        (`scoring.perplexity_scorer`; the data engine does not import models).
    """
    if bool(cfg.ppl_filter_model) != (scorer is not None):
        raise ValueError("prepare needs a scorer exactly when --data.ppl_filter_model is set")
    tcfg = tokenizer_cfg or TokenizerConfig()
    progress = sys.stderr.isatty() if progress is None else progress
    sources, corpus_info = _sources(cfg)
    settings = _settings(cfg, tcfg, sources, corpus_info)
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    if os.path.exists(os.path.join(data_dir, shards_lib.METADATA_FILE)):
        meta = shards_lib.read_metadata(data_dir)
        if meta.get("settings_fingerprint") == fingerprint:
            log(f"data already prepared in {data_dir}")
            return meta
        raise UserError(f"{data_dir} already holds data prepared with other settings (or "
                        f"from inputs changed since); choose a new --data.output_dir or "
                        f"remove that directory.")
    prog = _Progress(data_dir, fingerprint)
    t0 = time.time()
    resumed = bool(prog["stage"]) and os.path.exists(prog.docs_path)
    if resumed:
        log(f"resuming the interrupted prepare in {data_dir}")
    stage = prog["stage"] if resumed else _stage(cfg, sources, prog, progress, data_dir,
                                                 scorer)
    t_stage = time.time() - t0
    tok = _tokenizer(cfg, tcfg, data_dir, prog, log)
    written = _shards(cfg, tok, data_dir, prog, progress)
    report = Report.from_dict(stage["report"])
    splits = _summarize(written, report, cfg)
    if report.counts["documents_out"] == 0:
        _write_json(os.path.join(data_dir, REPORT_FILE), report.to_dict())
        raise UserError(f"prepare produced no samples: all {report.removed['no_target']} "
                        f"lost every target token to truncation; raise --data.cutoff_len / "
                        f"--data.seq_len (see {os.path.join(data_dir, REPORT_FILE)}).")
    if splits["train"]["documents"] == 0:
        raise UserError(f"prepare produced no training documents: {_why_no_training(prog)}.")
    dt = time.time() - t0
    n_docs, n_tokens = report.counts["documents_out"], report.counts["tokens_out"]
    report.info["throughput"] = {
        "seconds": round(dt, 3), "stage_seconds": round(t_stage, 3), "resumed": resumed,
        "documents_per_s": round(report.counts["documents_in"] / max(dt, 1e-9), 1),
        "tokens_per_s": round(n_tokens / max(dt, 1e-9), 1)}
    meta = {"settings_fingerprint": fingerprint, "corpus": corpus_info,
            "settings": settings["data"],
            "tokenizer": {**tok.spec(), "fingerprint": tok.fingerprint},
            "val_size": cfg.val_size, "max_samples": cfg.max_samples,
            "kind": "sft" if cfg.is_sft else "text",
            "features": ["tokens", "loss_mask"] if cfg.is_sft else ["tokens"],
            "token_dtype": shards_lib.token_dtype_for(tok.vocab_size), "splits": splits,
            "report": report.to_dict()}
    if cfg.is_sft:
        meta["template"] = TEMPLATES[cfg.template].to_dict()
    _write_json(os.path.join(data_dir, REPORT_FILE), report.to_dict())
    shards_lib.write_metadata(data_dir, meta)
    shutil.rmtree(prog.dir, ignore_errors=True)
    log(f"prepare report (also in {os.path.join(data_dir, REPORT_FILE)}):")
    for line in report.lines():
        log(line)
    log(f"prepared {n_docs} documents, {n_tokens:,} tokens into {data_dir} "
        f"({len(splits['train']['shards'])} train / {len(splits['validation']['shards'])} "
        f"validation shards) in {dt:.1f}s ({report.counts['documents_in'] / max(dt, 1e-9):,.0f}"
        f" documents/s, {n_tokens / max(dt, 1e-9):,.0f} tokens/s)")
    return shards_lib.read_metadata(data_dir)
