"""`DataConfig` (sources, cleaning, SFT, pipeline) and `TokenizerConfig`."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from deepseek_tf.config.base import _Section, _split_list, knob
from deepseek_tf.errors import ConfigError


#: When a `DataConfig` field acts (its `stage` metadata). "source": where the data comes
#: from and how prepare runs (the inputs are fingerprinted by content, not by these
#: values); "prepare": shapes the prepared shards; "sft": shapes SFT samples (format
#: alpaca / sharegpt); "pipeline": batching at train time, may differ between runs on
#: the same prepared directory.
DATA_STAGES = ("source", "prepare", "sft", "pipeline")


@dataclasses.dataclass(frozen=True)
class DataConfig(_Section):
    """Where the training data comes from, how prepare cleans it, how it is batched.

    Each field's `stage` metadata (`DATA_STAGES`) says when it acts: the values that
    shape prepared data (`prepared_settings()`: cleaning, SFT, split, shards) are
    recorded in the data's metadata.json; the pipeline fields (`pipeline_settings()`:
    seq_len, packing, augmentation, shuffling) may differ between runs on the same
    prepared directory.

    Example:
        >>> DataConfig(seq_len=128).seq_len
        128
        >>> DataConfig(inputs="corpus/,extra.jsonl").input_list
        ('corpus/', 'extra.jsonl')
    """

    SECTION = "data"

    # -- sources
    corpus: str = knob("stdlib", "Embedded corpus used when --data.inputs is empty: stdlib = "
                       "the Python standard library's own .py sources, found on this "
                       "machine (no download).", choices=("stdlib",), stage="source")
    inputs: str = knob("", "Comma-separated files or directories to prepare: .txt/.md/.py "
                       "(one document per file), .json/.jsonl, .csv, .parquet, or a Hugging "
                       "Face save_to_disk directory. Empty means --data.corpus.", stage="source")
    format: str = knob("text", "What the inputs hold: text (pretraining documents), alpaca "
                       "(instruction/input/output/system/history) or sharegpt "
                       "(conversations with roles).", choices=("text", "alpaca", "sharegpt"),
                       stage="prepare")
    text_field: str = knob("text", "Field holding a document's text in JSON/CSV/Parquet/"
                           "datasets records (format=text).", stage="prepare")
    text_extensions: str = knob(".txt,.md,.py", "Comma-separated extensions of plain files "
                                "read as one document each when walking a directory.",
                                stage="prepare")
    max_samples: int = knob(0, "Read at most this many input records/documents (0 = all).",
                            stage="prepare")
    num_proc: int = knob(1, "Worker processes for cleaning and tokenizing (order-preserving: "
                         "the output does not depend on it).", stage="source")
    on_error: str = knob("skip", "Malformed JSON lines, missing fields and undecodable bytes: "
                         "skip (count and list them as file:line in the report) or fail.",
                         choices=("skip", "fail"), stage="source")
    data_dir: str = knob("", "Directory of prepared TFRecord shards + metadata.json "
                         "(prepare writes it, train reads it; --data.output_dir is an alias); "
                         "empty means <workdir>/data.", stage="source")
    # -- cleaning (applied in this order; each step is counted in the report)
    normalize: str = knob("NFC", "Unicode normalization of every text (none = keep as is).",
                          choices=("none", "NFC", "NFKC"), stage="prepare")
    replace_regex: str = knob("", "Python regex whose matches are replaced by "
                              "--data.replacement (empty = off).", stage="prepare")
    replacement: str = knob("", "Replacement text for --data.replace_regex matches.",
                            stage="prepare")
    drop_regex: str = knob("", "Python regex: documents/samples with a match are dropped "
                           "(empty = off).", stage="prepare")
    min_chars: int = knob(1, "Drop documents shorter than this many characters (whitespace "
                          "ignored).", stage="prepare")
    max_chars: int = knob(0, "Drop documents longer than this many characters (0 = no limit).",
                          stage="prepare")
    dedup_exact: bool = knob(True, "Drop exact duplicates (same text after cleaning); the "
                             "first occurrence is kept.", stage="prepare")
    dedup_threshold: float = knob(0.0, "Drop near duplicates whose estimated Jaccard "
                                  "similarity (MinHash LSH over word n-grams) with an earlier "
                                  "document is >= this; 0 = off, 0.8 is a common choice.",
                                  stage="prepare")
    dedup_ngram: int = knob(5, "Words per shingle for near-duplicate detection.", stage="prepare")
    dedup_num_perm: int = knob(128, "MinHash permutations for near-duplicate detection.",
                               stage="prepare")
    ppl_filter_model: str = knob("", "Perplexity filter: score every document (its first "
                                 "--data.seq_len tokens) with this workdir's model and "
                                 "tokenizer, and drop those above --data.ppl_max (empty = "
                                 "off).", stage="prepare")
    ppl_max: float = knob(0.0, "Perplexity filter: the highest per-token perplexity kept "
                          "(of the filter model's tokens: per byte with the byte tokenizer).",
                          stage="prepare")
    # -- instruction data (format=alpaca / sharegpt)
    template: str = knob("deepseek3", "Chat template of SFT samples (see README).",
                         choices=("deepseek3", "deepseek-r1", "chatml", "plain"), stage="sft")
    train_on_prompt: bool = knob(False, "SFT: also train on prompt tokens (default: the loss "
                                 "covers assistant tokens only).", stage="sft")
    mask_history: bool = knob(False, "SFT: train only on the last assistant turn.", stage="sft")
    cutoff_len: int = knob(0, "SFT: longest sample in tokens; longer ones lose their oldest "
                           "turns, then their tail (0 = seq_len).", stage="sft")
    # -- split and shards
    val_size: float = knob(0.05, "Validation split: a fraction of documents (< 1) or a "
                           "document count (>= 1); deterministic, by document name.",
                           stage="prepare")
    shard_size_mb: float = knob(4.0, "Target size of one TFRecord shard in MB.", stage="prepare")
    # -- pipeline (may change between runs on the same prepared data)
    seq_len: int = knob(256, "Tokens per packed training window.", stage="pipeline")
    packing: str = knob("pack", "Long documents: pack = concatenate into windows (SFT samples "
                        "are packed whole, never split); window = one document per row, cut "
                        "into sliding windows overlapping by --data.stride tokens.",
                        choices=("pack", "window"), stage="pipeline")
    stride: int = knob(0, "Overlap in tokens between consecutive sliding windows "
                       "(packing=window); overlapping tokens are context, not targets.",
                       stage="pipeline")
    augment: str = knob("none", "Training-time input masking (pretraining augmentation): "
                        "token = random single tokens, span = random spans of --data.mask_span "
                        "tokens are replaced by the pad id in the inputs; targets unchanged.",
                        choices=("none", "token", "span"), stage="pipeline")
    mask_rate: float = knob(0.15, "Fraction of input tokens masked by --data.augment.",
                            stage="pipeline")
    mask_span: int = knob(3, "Span length of --data.augment=span.", stage="pipeline")
    shuffle_buffer: int = knob(1024, "Windows in the seeded shuffle buffer (0 = no shuffle).",
                               stage="pipeline")
    cycle_length: int = knob(4, "Shards read in parallel by the interleave.", stage="pipeline")

    def __post_init__(self):
        self._coerce_and_check_types()
        r = self._require
        r(self.seq_len >= 2, f"--data.seq_len must be >= 2, got {self.seq_len}.")
        r(self.val_size >= 0, f"--data.val_size must be >= 0, got {self.val_size}.")
        r(self.val_size < 1 or float(self.val_size).is_integer(),
          f"--data.val_size={self.val_size}: use a fraction below 1 or a whole count.")
        r(self.max_samples >= 0, "--data.max_samples must be >= 0 (0 = all).")
        r(self.num_proc >= 1, f"--data.num_proc must be >= 1, got {self.num_proc}.")
        r(self.shard_size_mb > 0, "--data.shard_size_mb must be > 0.")
        r(self.shuffle_buffer >= 0, "--data.shuffle_buffer must be >= 0.")
        r(self.cycle_length >= 1, "--data.cycle_length must be >= 1.")
        r(self.min_chars >= 0, "--data.min_chars must be >= 0.")
        r(self.max_chars >= 0, "--data.max_chars must be >= 0 (0 = no limit).")
        r(not self.max_chars or self.max_chars >= self.min_chars,
          f"--data.max_chars={self.max_chars} is below --data.min_chars={self.min_chars}.")
        r(0 <= self.dedup_threshold <= 1,
          f"--data.dedup_threshold must be in [0, 1] (0 = off), got {self.dedup_threshold}.")
        r(self.dedup_ngram >= 1, "--data.dedup_ngram must be >= 1.")
        r(bool(self.ppl_filter_model) == (self.ppl_max > 0),
          "--data.ppl_filter_model=WORKDIR and --data.ppl_max > 0 go together (the filter "
          "model and the highest perplexity kept).")
        r(8 <= self.dedup_num_perm <= 1024, "--data.dedup_num_perm must be in [8, 1024].")
        for name in ("replace_regex", "drop_regex"):
            pattern = getattr(self, name)
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"--data.{name}={pattern!r} is not a valid regex: {e}.") from e
        r(self.cutoff_len >= 0, "--data.cutoff_len must be >= 0 (0 = seq_len).")
        r(self.cutoff_len <= self.seq_len + 1,
          f"--data.cutoff_len={self.cutoff_len} does not fit one window of --data.seq_len="
          f"{self.seq_len} (+1 target); raise seq_len or lower cutoff_len.")
        r(self.stride >= 0 and self.stride < self.seq_len,
          f"--data.stride={self.stride} must be in [0, seq_len={self.seq_len}).")
        r(0 < self.mask_rate < 1, f"--data.mask_rate must be in (0, 1), got {self.mask_rate}.")
        r(self.mask_span >= 1, "--data.mask_span must be >= 1.")
        r(all(e.startswith(".") for e in _split_list(self.text_extensions)),
          f"--data.text_extensions={self.text_extensions!r}: use e.g. .txt,.md,.py")

    @classmethod
    def fields_of(cls, stage: str) -> tuple[str, ...]:
        """Names of the fields of one of `DATA_STAGES`, in declaration order."""
        if stage not in DATA_STAGES:
            raise ValueError(f"unknown data stage {stage!r}; expected one of {DATA_STAGES}.")
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata["stage"] == stage)

    def prepared_settings(self) -> dict[str, Any]:
        """The values that shape the prepared data (prepare fingerprints them in
        metadata.json): the "prepare" fields, plus the "sft" ones (cutoff_len resolved)
        for SFT formats."""
        d = {k: getattr(self, k) for k in self.fields_of("prepare")
             if self.ppl_filter_model or not k.startswith("ppl_")}  # off: as before it existed
        if self.is_sft:
            d.update({k: getattr(self, k) for k in self.fields_of("sft")},
                     cutoff_len=self.resolved_cutoff_len)
        return d

    def pipeline_settings(self) -> dict[str, Any]:
        """The "pipeline" fields: how prepared data is batched for one run."""
        return {k: getattr(self, k) for k in self.fields_of("pipeline")}

    @property
    def input_list(self) -> tuple[str, ...]:
        """--data.inputs as a tuple of paths."""
        return _split_list(self.inputs)

    @property
    def is_sft(self) -> bool:
        return self.format in ("alpaca", "sharegpt")

    @property
    def resolved_cutoff_len(self) -> int:
        return self.cutoff_len or self.seq_len


@dataclasses.dataclass(frozen=True)
class TokenizerConfig(_Section):
    """Which tokenizer prepare builds (or trains) and saves with the data.

    Example:
        >>> TokenizerConfig(type="sentencepiece", vocab_size=4000).vocab_size
        4000
    """

    SECTION = "tokenizer"

    type: str = knob("byte", "byte = 256 byte ids + BOS/EOS/PAD (no files); sentencepiece = "
                     "trained on the prepared corpus (runs in-graph via tensorflow-text); hf = "
                     "a Hugging Face tokenizer.json (--tokenizer.path), as DeepSeek "
                     "checkpoints ship.", choices=("byte", "sentencepiece", "hf"))
    vocab_size: int = knob(8000, "Vocabulary size to train (sentencepiece).")
    path: str = knob("", "hf: tokenizer.json or a directory holding it (and optionally "
                     "tokenizer_config.json); sentencepiece: an existing .model file to use "
                     "instead of training one.")
    model_type: str = knob("bpe", "SentencePiece algorithm.", choices=("bpe", "unigram"))
    sample_lines: int = knob(1_000_000, "SentencePiece trains on at most this many lines, "
                             "sampled from the corpus.")
    bos_token: str = knob("", "hf: the BOS token (default: tokenizer_config.json's).")
    eos_token: str = knob("", "hf: the EOS token (default: tokenizer_config.json's).")
    pad_token: str = knob("", "hf: the PAD token (default: tokenizer_config.json's, else EOS).")

    def __post_init__(self):
        self._coerce_and_check_types()
        r = self._require
        r(self.type != "hf" or bool(self.path),
          "--tokenizer.type=hf needs --tokenizer.path=DIR_OR_tokenizer.json.")
        r(self.type != "sentencepiece" or self.path or self.vocab_size >= 300,
          f"--tokenizer.vocab_size={self.vocab_size} is too small for a byte-fallback "
          f"SentencePiece model (256 byte pieces + specials); use >= 300.")
        r(self.sample_lines > 0, "--tokenizer.sample_lines must be > 0.")
