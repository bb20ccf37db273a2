"""The chat template rendered inside a TensorFlow graph (the SavedModel's `chat` signature).

A request is a conversation as three batched tensors, so TF Serving's batching can merge
requests and pad them (`pad_variable_length_inputs`) without changing their meaning:

    roles         string [B, M]  system | user | assistant | tool
    contents      string [B, M]  the message texts
    num_messages  int32 [B]      how many of the M entries are real (the rest, padding
                                 of any value, is ignored)

Why not one JSON string per request: TensorFlow has no builtin op that parses general
JSON inside a graph (`tf.io.decode_json_example` reads only tf.Example protos), and a
SavedModel must run on the stock model server. Parallel string tensors need only
builtin ops (`tf.equal`, `tf.strings.join`, `tf.strings.regex_replace`, ragged
gather/concat) and the in-graph tokenizer.

The ids equal what training renders (`generate.text.chat_prompt_ids`, built on
`data.sft`): every turn's text is tokenized as one string with its template text
around it, template specials (BOS/EOS) become ids, the separator goes between an answer
and the next prompt, a system message (first only) or the template's default system
text follows the prefix, and reasoning templates drop the reasoning of earlier answers
and append their think prompt to the last prompt. Bad conversations fail with
INVALID_ARGUMENT and a message that says what to send.

Example:
    >>> render = ChatRenderer(TEMPLATES["chatml"], tok, tok.tf_tokenizer())
    >>> ids, lengths = render(tf.constant([["user"]]), tf.constant([["Hi"]]), tf.constant([1]))
"""

from __future__ import annotations

import tensorflow as tf

from deepseek_tf.data.sft import encode_pieces
from deepseek_tf.data.templates import Special, Template, pieces
from deepseek_tf.errors import UserError

ROLES = ("system", "user", "assistant", "tool")
_SYSTEM, _USER, _ASSISTANT, _TOOL = range(4)
_MARK = "\x00content\x00"


def _split_format(fmt: str, tok) -> tuple[list[int], str, str, bool, list[int]]:
    """(lead ids, text before the content, text after it, has content, trail ids) of a
    format that is specials, one text run, specials (every shipped template is)."""
    items = pieces(fmt, content=_MARK)
    lead, trail = [], []
    while items and isinstance(items[0], Special):
        lead.append(items.pop(0))
    while items and isinstance(items[-1], Special):
        trail.insert(0, items.pop())
    if any(isinstance(i, Special) for i in items):
        raise UserError(f"chat format {fmt!r} has a special token inside its text; the "
                        f"in-graph renderer handles specials only at either end.")
    text = "".join(items)
    before, _, after = text.partition(_MARK)
    ids = lambda specials: [int(i) for i in encode_pieces(specials, tok)]  # noqa: E731
    return ids(lead), before, after, _MARK in text, ids(trail)


class ChatRenderer:
    """Renders batched conversations into right-padded prompt ids in the graph.

    Args:
      template: the run's chat `Template`.
      tok: the run's tokenizer (for the template's own text and special ids).
      tf_tok: its in-graph tokenizer (`tok.tf_tokenizer()`).
    """

    def __init__(self, template: Template, tok, tf_tok):
        t = template
        # Unit kinds: 0-3 a message by role, 4/5 the last prompt (user/tool + think
        # prompt), 6/7 the head with/without system text.
        formats = [t.system, t.user, t.assistant, t.observation, t.user + t.think_prompt,
                   t.observation + t.think_prompt, t.prefix + t.system, t.prefix]
        self.parts = [_split_format(f, tok) for f in formats]  # Python: graph constants
        self.sep = [int(i) for i in encode_pieces(pieces(t.separator), tok)]  # per call
        self.default_system, self.think = t.default_system, bool(t.think)
        self.tf_tok = tf_tok

    def checks(self, role, valid, num, m):
        """In-graph checks of a conversation (INVALID_ARGUMENT messages)."""
        b = tf.shape(role)[0]
        pos = tf.range(m)[tf.newaxis, :]
        has_sys = role[:, 0] == _SYSTEM
        turn = pos - tf.cast(has_sys, tf.int32)[:, tf.newaxis]        # index after system
        prompt = (role == _USER) | (role == _TOOL)
        ok = tf.where(role == _SYSTEM, pos == 0,
                      tf.where(turn % 2 == 0, prompt, role == _ASSISTANT))
        last = tf.gather(role, tf.clip_by_value(num - 1, 0, m - 1), batch_dims=1)
        return [
            tf.debugging.assert_equal(tf.shape(num)[0], b, message=(
                "num_messages needs one entry per row of roles")),
            tf.debugging.assert_greater_equal(num, 1, message="num_messages must be >= 1"),
            tf.debugging.assert_less_equal(num, m, message=(
                "num_messages exceeds the width of roles/contents")),
            tf.debugging.assert_equal(tf.reduce_all(ok | ~valid), True, message=(
                "messages must be: an optional system message first, then user (or tool) "
                "and assistant turns alternating, starting with user; roles are system, "
                "user, assistant, tool")),
            tf.debugging.assert_equal(tf.reduce_all((last == _USER) | (last == _TOOL)), True,
                                      message="the last message must be from user or tool "
                                              "(the model answers it)"),
        ], has_sys, turn, prompt

    def __call__(self, roles, contents, num_messages):
        """(ids int32 (B, T) right-padded with 0, lengths int32 (B,))."""
        roles = tf.convert_to_tensor(roles, tf.string)
        contents = tf.convert_to_tensor(contents, tf.string)
        num = tf.convert_to_tensor(num_messages, tf.int32)
        b, m = tf.shape(roles)[0], tf.shape(roles)[1]
        shape_ok = tf.debugging.assert_equal(tf.shape(contents), tf.shape(roles), message=(
            "roles and contents must have the same shape [B, M]"))
        with tf.control_dependencies([shape_ok]):
            match = tf.equal(roles[:, :, tf.newaxis], tf.constant(ROLES))   # (B, M, 4)
        valid = tf.range(m)[tf.newaxis, :] < num[:, tf.newaxis]             # (B, M)
        known = tf.reduce_any(match, axis=-1)
        role = tf.where(known, tf.argmax(tf.cast(match, tf.int32), -1, output_type=tf.int32),
                        -1)
        checks, has_sys, turn, prompt = self.checks(role, valid, num, m)
        checks.append(tf.debugging.assert_equal(tf.reduce_all(known | ~valid), True, message=(
            "unknown role: roles are system, user, assistant, tool")))
        with tf.control_dependencies(checks):
            role = tf.identity(role)
        is_last = tf.range(m)[tf.newaxis, :] == (num - 1)[:, tf.newaxis]
        kind = tf.where(is_last & (role == _USER), 4, tf.where(is_last & (role == _TOOL), 5,
                                                               tf.maximum(role, 0)))
        if self.think:  # earlier answers lose their reasoning, as in training
            stripped = tf.strings.regex_replace(contents, r"(?s)^\s*<think>.*?</think>\n*", "")
            contents = tf.where(role == _ASSISTANT, stripped, contents)
        system = tf.where(has_sys, contents[:, 0], self.default_system)       # (B,)
        head = tf.where(tf.strings.length(system) > 0, 6, 7)
        kind = tf.concat([head[:, tf.newaxis], kind], axis=1)                 # (B, M + 1)
        text = tf.concat([system[:, tf.newaxis], contents], axis=1)
        keep = tf.concat([tf.ones([b, 1], tf.bool), valid & (role != _SYSTEM)], axis=1)
        sep = tf.concat([tf.zeros([b, 1], tf.int32),
                         tf.cast((turn > 0) & prompt, tf.int32)], axis=1)
        flat_kind = tf.reshape(kind, [-1])
        table = lambda i: tf.ragged.constant([p[i] for p in self.parts], tf.int32,  # noqa: E731
                                             ragged_rank=1)
        column = lambda i: tf.gather(tf.constant([p[i] for p in self.parts]), flat_kind)  # noqa
        body = tf.where(column(3), tf.reshape(text, [-1]), "")
        text = tf.strings.join([column(1), body, column(2)])
        tokens = tf.cast(self.tf_tok.tokenize(text), tf.int32)                 # (N, None)
        seps = tf.ragged.constant([[], self.sep], tf.int32, ragged_rank=1)
        units = tf.concat([tf.gather(seps, tf.reshape(sep, [-1])),
                           tf.gather(table(0), flat_kind), tokens,
                           tf.gather(table(4), flat_kind)], axis=1)
        units = tf.RaggedTensor.from_uniform_row_length(  # (B, M + 1, None)
            units, tf.cast(m + 1, units.row_splits.dtype))
        ids = tf.ragged.boolean_mask(units, keep).merge_dims(1, 2)            # (B, None)
        return ids.to_tensor(0), tf.cast(ids.row_lengths(), tf.int32)
