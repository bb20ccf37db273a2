"""`python -m deepseek_tf.generate --workdir=DIR --prompt="..."`

Generates text with a trained (or converted) workdir's latest checkpoint, using
the KV-cached decode loop compiled into one TensorFlow graph. A single prompt is
streamed as it is produced, then a speed line goes to stderr. `--chat` wraps the
prompt in the run's chat template (`--data.template` of the run, or --template)
and stops at its end-of-turn marker. `--input_file=prompts.jsonl` (one
{"prompt": ...} or {"instruction": ..., "input": ...} per line) with
`--output_file=out.jsonl` generates in batches of --batch_size; `--output_format=alpaca`
writes {instruction, output} records, an SFT dataset `prepare` reads as is (a teacher's
answers for sequence-level distillation).

`--tflite=model.tflite` runs a file from `export --format=tflite` in ai-edge-litert's
interpreter instead (the same samplers; the tokenizer and chat template come from
--workdir, or the byte tokenizer when no workdir is given).

Sampling: --temperature=0 is greedy; otherwise --top_k / --top_p filter. Without
--seed each run draws a fresh seed (different text each time); --seed=N makes the draw
reproducible (same seed, same text).
"""

import json
import os
import sys
import time

from deepseek_tf.quiet import quiet_tensorflow  # noqa: E402

quiet_tensorflow()  # TF start-up and grappler/XLA log noise off (README)

from deepseek_tf.xla_cache import enable_xla_cache  # noqa: E402

enable_xla_cache()  # XLA programs compiled once per machine (README, "Generating text")

from absl import flags  # noqa: E402

from deepseek_tf import flags as dflags  # noqa: E402
from deepseek_tf.errors import UserError  # noqa: E402

flags.DEFINE_string("workdir", None, "Run directory (trained or converted) to generate with.")
flags.DEFINE_string("checkpoint", "", "A checkpoint path to use instead of the latest.")
flags.DEFINE_string("prompt", None, "The prompt text.")
flags.DEFINE_string("input_file", None, "JSONL prompts: {\"prompt\": ...} or alpaca-style "
                    "{\"instruction\", \"input\"} per line.")
flags.DEFINE_string("output_file", None, "JSONL results of --input_file (default: stdout).")
flags.DEFINE_enum("output_format", "results", ["results", "alpaca"],
                  "--input_file results: results = {prompt, completion, num_tokens, "
                  "stop_reason} per prompt; alpaca = {instruction: prompt, output: "
                  "completion} (an SFT dataset `prepare --data.format=alpaca` reads as is: "
                  "sequence-level distillation; empty answers are left out (none left is an "
                  "error), and the count of answers cut at --max_new_tokens goes to stderr).")
flags.DEFINE_bool("chat", False, "Wrap each prompt in the run's chat template and stop at "
                  "its end-of-turn marker.")
flags.DEFINE_string("template", "", "Chat template for --chat (default: the run's "
                    "--data.template).")
flags.DEFINE_string("system", "", "System text for --chat.")
flags.DEFINE_integer("max_new_tokens", 128, "Most tokens to generate per prompt (the CLI and "
                     "evaluate default; a SavedModel's is export --max_new_tokens).",
                     lower_bound=1)
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy.", lower_bound=0.0)
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens; 0 = off.", lower_bound=0)
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1]; 1 = off.")
flags.DEFINE_integer("seed", -1, "Sampling seed >= 0 (same seed, same text); -1 = a "
                     "fresh seed each run.", lower_bound=-1)
flags.DEFINE_integer("batch_size", 8, "Prompts per batch with --input_file.", lower_bound=1)
flags.DEFINE_integer("max_length", 0, "Cache length (prompt + new tokens); 0 = just enough "
                     "for the longest prompt, at most the model's max_position_embeddings.",
                     lower_bound=0)
dflags.define_quantize()
dflags.define_jit_compile("auto", "Compile each decode step with XLA: true, false, or auto "
                          "= time a few steps both ways on this machine first and keep the "
                          "faster (with XLA, then the same for the prefill at 128 and 512 "
                          "prompt tokens).")
flags.DEFINE_string("tflite", None, "Generate with this .tflite file (export --format=tflite) "
                    "through ai-edge-litert instead of the TensorFlow model.")
flags.DEFINE_integer("num_threads", 0, "--tflite: interpreter threads (0 = its default).",
                     lower_bound=0)
flags.DEFINE_bool("absorb", True, "MLA: decode in latent space (absorbed projections); "
                  "--noabsorb expands the cached latent each step (the reference path).")
FLAGS = flags.FLAGS


def _read_prompts(path: str) -> list[str]:
    prompts = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    text = rec["prompt"] if "prompt" in rec else "\n".join(
                        s for s in (rec["instruction"], rec.get("input", "")) if s)
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise UserError(f"{path}:{n}: not a JSON object with a \"prompt\" (or "
                                    f"\"instruction\") string ({type(e).__name__}: {e}).")
                prompts.append(str(text))
    except OSError as e:
        raise UserError(f"cannot read --input_file: {e}") from e
    if not prompts:
        raise UserError(f"{path} holds no prompts.")
    return prompts


class _Streamer:
    """Prints row 0's new text as tokens arrive (holding back half a UTF-8 character)."""

    def __init__(self, tok, stops):
        self.tok, self.stops, self.ids, self.shown, self.stopped = tok, stops, [], "", False
        self.times = []  # arrival of each token

    @property
    def first(self):
        return self.times[0] if self.times else None

    def speed(self, start: float) -> str:
        """'first token after A s, ... then R tokens/s': the rate counts from the second
        token on, after the graph build, the prefill and any XLA compile of the step."""
        t = self.times
        if len(t) < 3:
            return f"{len(t)} tokens in {time.perf_counter() - start:.2f} s"
        return (f"{len(t)} tokens in {t[-1] - start:.2f} s: first after {t[0] - start:.2f} s, "
                f"second after {t[1] - start:.2f} s (graph build, prefill, step compile), "
                f"then {(len(t) - 2) / max(t[-1] - t[1], 1e-9):.1f} tokens/s")

    def __call__(self, step, tokens, done):
        from deepseek_tf.generate.text import stream_text
        self.times.append(time.perf_counter())
        if self.stopped:
            return
        self.ids.append(int(tokens[0]))
        text, self.stopped = stream_text(self.ids, self.tok, self.stops)
        if len(text) <= len(self.shown):
            return
        sys.stdout.write(text[len(self.shown):])
        sys.stdout.flush()
        self.shown = text

    def finish(self):
        """Prints what was held back (the end of the text), then a newline."""
        from deepseek_tf.generate.text import cut_at_stop, strip_special
        text, _ = cut_at_stop(self.tok.decode(strip_special(self.ids, self.tok)), self.stops)
        print(text[len(self.shown):], flush=True)


def main(argv):
    if not FLAGS.workdir and not FLAGS.tflite:
        raise UserError("--workdir is required (see --help).")
    if (FLAGS.prompt is None) == (FLAGS.input_file is None):
        raise UserError("give exactly one of --prompt or --input_file.")
    if not 0 < FLAGS.top_p <= 1:
        raise UserError(f"--top_p={FLAGS.top_p} must be in (0, 1].")
    from deepseek_tf.generate.text import chat_profile
    from deepseek_tf.workdir import load_experiment, load_run_tokenizer
    if FLAGS.tflite and not FLAGS.workdir:
        return _run_tflite(None, None)
    exp = load_experiment(FLAGS.workdir)
    tok = load_run_tokenizer(FLAGS.workdir, exp)
    profile = chat_profile(exp, tok, FLAGS.template, chat=FLAGS.chat)
    if FLAGS.tflite:
        return _run_tflite(tok, profile)
    prompts = [FLAGS.prompt] if FLAGS.prompt is not None else _read_prompts(FLAGS.input_file)
    from deepseek_tf.generate import text as gtext
    encoded = [gtext.prompt_ids(p, tok, profile.template, FLAGS.system) for p in prompts]
    longest = max(len(e) for e in encoded)
    limit = exp.model.max_position_embeddings
    max_length = FLAGS.max_length or min(limit, longest + FLAGS.max_new_tokens)
    if longest + FLAGS.max_new_tokens > max_length:
        raise UserError(f"the longest prompt has {longest} tokens; with --max_new_tokens="
                        f"{FLAGS.max_new_tokens} that exceeds the cache of {max_length} "
                        f"(--max_length, at most the model's max_position_embeddings={limit}); "
                        f"shorten the prompt or lower --max_new_tokens.")
    from deepseek_tf.generate.run import pick_generator, run_batches
    from deepseek_tf.workdir import load_workdir
    model, _ = load_workdir(FLAGS.workdir, FLAGS.checkpoint)
    quantize = dflags.quantize_options(FLAGS)
    if quantize:
        from deepseek_tf.quantize import quantize_run
        model = quantize_run(model, exp, tok, log=lambda m: print(m, file=sys.stderr),
                     workdir=FLAGS.workdir, **quantize)
    gen = None if FLAGS.jit_compile != "auto" else pick_generator(  # before the clock starts
        model, max_length, profile.stops, tok.pad_id, FLAGS.absorb,
        log=lambda m: print(m, file=sys.stderr))
    streamer = _Streamer(tok, profile.stop_strings) if FLAGS.prompt is not None else None
    start = time.perf_counter()
    results = run_batches(model, tok, encoded, max_length, profile.stops, profile.stop_strings,
                          FLAGS.batch_size, streamer=streamer, absorb=FLAGS.absorb,
                          jit_compile=FLAGS.jit_compile, generator=gen,
                          max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                          top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed)
    seconds = time.perf_counter() - start
    total = sum(r["num_tokens"] for r in results)
    if streamer is not None:
        streamer.finish()
        print(f"[{streamer.speed(start)}]", file=sys.stderr)
        return
    _write_results([{"prompt": p, **r} for p, r in zip(prompts, results)])
    print(f"[{len(prompts)} prompts, {total} tokens in {seconds:.2f} s: "
          f"{total / seconds:.1f} tokens/s incl. graph build]", file=sys.stderr)


def _write_results(rows: list[dict]) -> None:
    """--input_file results to --output_file (or stdout) in --output_format."""
    if FLAGS.output_format == "alpaca":
        cut = sum(r["stop_reason"] == "length" for r in rows)
        kept = [r for r in rows if r["completion"].strip()]
        print(f"[alpaca: {len(kept)} records; {len(rows) - len(kept)} empty answers left "
              f"out; {cut} answers cut at --max_new_tokens={FLAGS.max_new_tokens}]",
              file=sys.stderr)
        if not kept:
            raise UserError("every answer was empty: no SFT record to write; raise "
                            "--max_new_tokens or check the teacher's chat template (--chat, "
                            "--template).")
        rows = [{"instruction": r["prompt"], "output": r["completion"]} for r in kept]
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    if FLAGS.output_file:
        with open(FLAGS.output_file, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    else:
        print("\n".join(lines))


def _run_tflite(tok, profile):
    """--tflite: one prompt at a time through the interpreter's signature runners."""
    from deepseek_tf.generate import text as gtext
    from deepseek_tf.generate.tflite_runner import TFLiteRunner
    if FLAGS.chat and profile is None:
        raise UserError("--chat with --tflite needs --workdir (for the run's template).")
    if tok is None:
        from deepseek_tf.data.tokenizer.byte import ByteTokenizer
        tok = ByteTokenizer()
        profile = gtext.ChatProfile.of(tok, None)
    template = profile.template
    if not os.path.exists(FLAGS.tflite):
        raise UserError(f"--tflite={FLAGS.tflite}: no such file.")
    runner = TFLiteRunner(FLAGS.tflite, FLAGS.num_threads or None)
    prompts = [FLAGS.prompt] if FLAGS.prompt is not None else _read_prompts(FLAGS.input_file)
    stop_ids, stops = profile.stops, profile.stop_strings
    sampling = dict(max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                    top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed, stop_ids=stop_ids)
    lines, total, start = [], 0, time.perf_counter()
    for prompt in prompts:
        ids = gtext.prompt_ids(prompt, tok, template, FLAGS.system)
        streamer = _Streamer(tok, stops) if FLAGS.prompt is not None else None
        t0 = time.perf_counter()
        out = runner.generate(ids, streamer=None if streamer is None else (
            lambda step, token: streamer(step, [token], None)), **sampling)
        seconds, total = time.perf_counter() - t0, total + len(out)
        if streamer is not None:
            streamer.finish()
            after = time.perf_counter() - (streamer.first or t0)
            rate = (len(out) - 1) / after if len(out) > 1 and after > 0 else 0.0
            print(f"[{len(out)} tokens in {seconds:.2f} s (TFLite): first token after "
                  f"{(streamer.first or t0) - t0:.3f} s (prefill), then {rate:.1f} tokens/s]",
                  file=sys.stderr)
            return
        text, cut = gtext.cut_at_stop(tok.decode(gtext.strip_special(out, tok)), stops)
        stopped = cut or any(tuple(out[-len(s):]) == s for s in stop_ids)
        lines.append({"prompt": prompt, "completion": text, "num_tokens": len(out),
                      "stop_reason": "stop" if stopped else "length"})
    _write_results(lines)
    seconds = time.perf_counter() - start
    print(f"[{len(prompts)} prompts, {total} tokens in {seconds:.2f} s (TFLite): "
          f"{total / seconds:.1f} tokens/s]", file=sys.stderr)


def entry():
    dflags.run(main)


if __name__ == "__main__":
    entry()
