"""The HTTP server as clients use it: the official `openai` client for chat, completions,
streaming and errors, raw HTTP for `/generate` and `/metrics`. A tiny V3-style run (MLA +
MoE) is served in this process (`BackgroundServer`, XLA decode steps, batches padded to 1,
2 or 4 rows); every greedy or seeded output must equal the generator's own
(`run_batches`, what `python -m deepseek_tf.generate` runs) on the same run."""

import json
import re
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

from deepseek_tf.data.tokenizer.byte import ByteTokenizer
from deepseek_tf.generate.decode import Generator
from deepseek_tf.generate.run import run_batches
from deepseek_tf.generate.text import chat_profile, prompt_ids
from deepseek_tf.serve.server import BackgroundServer, load_service
from deepseek_tf.workdir import load_experiment
from tests.helpers.workdirs import make_workdir

N = 8  # new tokens per greedy request
PROMPTS = [f"Prompt {i}: the {w}" for i, w in enumerate(
    "cat sat on a mat and then it ran far away over hills".split())]  # 13 prompts


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path, model = make_workdir(str(tmp_path_factory.mktemp("serve") / "tiny"), "mla_moe")
    service = load_service(path, max_batch=4, max_queue=32, jit_compile="true",
                           log=lambda *_: None)
    tok = ByteTokenizer()
    profile = chat_profile(load_experiment(path), tok, chat=True)
    gen = Generator(model, service.engine.max_length, profile.stops, tok.pad_id)
    with BackgroundServer(service) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                               timeout=60)
        yield dict(server=server, service=service, client=client, tok=tok, profile=profile,
                   model=model, gen=gen, name=service.model_name)


def expected(run, prompts, template=None, system="", **sampling):
    """What the generator gives for these prompts (list of dicts of run_batches)."""
    tok, profile = run["tok"], run["profile"]
    ids = [prompt_ids(p, tok, template, system) for p in prompts]
    return run_batches(run["model"], tok, ids, run["gen"].max_length, profile.stops,
                       profile.stop_strings, generator=run["gen"],
                       **{"max_new_tokens": N, "temperature": 0.0, **sampling})


def metric(run, name) -> float:
    text = urllib.request.urlopen(run["server"].url + "/metrics").read().decode()
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_models_and_health(run):
    assert [m.id for m in run["client"].models.list().data] == [run["name"]]
    health = json.loads(urllib.request.urlopen(run["server"].url + "/health").read())
    assert health["status"] == "ok" and health["max_length"] == 128


def test_greedy_completion_equals_generate_streamed_and_not(run):
    client, want = run["client"], expected(run, PROMPTS[:1])[0]
    out = client.completions.create(model=run["name"], prompt=PROMPTS[0], max_tokens=N,
                                    temperature=0)
    assert out.choices[0].text == want["completion"]
    assert out.choices[0].finish_reason == want["stop_reason"]
    n_prompt = len(prompt_ids(PROMPTS[0], run["tok"]))
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (n_prompt, want["num_tokens"])
    chunks = list(client.completions.create(model=run["name"], prompt=PROMPTS[0], max_tokens=N,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want["completion"]
    assert len(chunks) >= 4  # streamed piece by piece
    assert chunks[-1].usage.completion_tokens == want["num_tokens"]
    both = client.completions.create(model=run["name"], prompt=PROMPTS[:2], max_tokens=N,
                                     temperature=0, echo=True)
    assert [c.text for c in both.choices] == [
        p + r["completion"] for p, r in zip(PROMPTS, expected(run, PROMPTS[:2]))]


def test_chat_uses_the_runs_template_streamed_and_not(run):
    client, template = run["client"], run["profile"].template
    want = expected(run, ["Hello there"], template, system="Be brief.")[0]
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hello there"}]
    out = client.chat.completions.create(model=run["name"], messages=messages, max_tokens=N,
                                         temperature=0)
    assert out.choices[0].message.content == want["completion"]
    assert out.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=run["name"], messages=messages,
                                            max_tokens=N, temperature=0, stream=True)
    deltas = [c.choices[0].delta for c in stream]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == want["completion"]


def test_seeded_sampling_equals_generate_and_n_choices_use_seed_plus_k(run):
    out = run["client"].completions.create(model=run["name"], prompt=PROMPTS[1], max_tokens=N,
                                           temperature=0.9, top_p=0.95, seed=5, n=2,
                                           extra_body={"top_k": 40})
    texts = [c.text for c in out.choices]
    for k in range(2):
        want = expected(run, PROMPTS[1:2], temperature=0.9, top_p=0.95, top_k=40, seed=5 + k)
        assert texts[k] == want[0]["completion"]


def test_a_stop_string_cuts_the_text(run):
    full = expected(run, PROMPTS[:1])[0]["completion"]
    stop = full[3:5]
    assert len(stop) == 2 and stop in full
    out = run["client"].completions.create(model=run["name"], prompt=PROMPTS[0], max_tokens=N,
                                           temperature=0, stop=[stop])
    assert out.choices[0].text == full[:full.index(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_16_concurrent_streaming_clients_each_get_their_own_output(run):
    prompts = PROMPTS + ["x" * 30, "y", "a longer prompt of several words here"]
    want = [r["completion"] for r in expected(run, prompts)]
    got, errors = [None] * len(prompts), []

    def client(i):
        try:
            stream = run["client"].completions.create(
                model=run["name"], prompt=prompts[i], max_tokens=N, temperature=0, stream=True)
            got[i] = "".join(c.choices[0].text for c in stream)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    batches = metric(run, "deepseek_tf_batch_size_count")
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and got == want
    assert metric(run, "deepseek_tf_batch_size_count") - batches < len(prompts) / 2  # batched


def test_a_disconnecting_client_frees_its_slot(run):
    before = metric(run, "deepseek_tf_generated_tokens_total")
    stream = run["client"].completions.create(model=run["name"], prompt="Tell me", stream=True,
                                              max_tokens=100, temperature=0)
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 30
    while run["service"].engine.active_rows() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # the batch's tokens are counted as it ends
    assert run["service"].engine.active_rows() == 0
    assert metric(run, "deepseek_tf_generated_tokens_total") - before < 50
    assert expected(run, ["Tell me"], max_new_tokens=100)[0]["num_tokens"] >= 50


@pytest.mark.parametrize("kwargs,needle", [
    (dict(model="other"), "is not served here"),
    (dict(temperature=5), "temperature"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=500), "lower max_tokens to at most"),
    (dict(prompt="x" * 200), "shorten it"),
    (dict(n=99), "n:"),
])
def test_bad_requests_get_a_400_with_an_openai_error(run, kwargs, needle):
    args = {**dict(model=run["name"], prompt="Hi", max_tokens=4), **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        run["client"].completions.create(**args)
    assert needle in e.value.body["message"], e.value.body
    assert e.value.body["type"] == "invalid_request_error"


def test_bad_chat_and_bad_types_get_400_and_the_server_lives_on(run):
    with pytest.raises(openai.BadRequestError, match="last message must be from the user"):
        run["client"].chat.completions.create(model=run["name"], max_tokens=2, messages=[
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}])
    for body in (b'{"model": "x", "prompt": "Hi", "max_tokens": "4"}', b"{not json",
                 b'["a list"]'):
        status, reply = post(run, "/v1/completions", body)
        assert status == 400 and reply["error"]["message"], reply
    assert post(run, "/v1/completions", b'{"model": "x", "prompt": "Hi", "max_tokens": "4"}')[1][
        "error"]["param"] == "max_tokens"
    assert run["client"].models.list().data


def test_full_queue_gives_429_and_a_timeout_504(run):
    service, create = run["service"], run["client"].completions.create
    engine = service.engine
    engine.max_queue, engine.window = 1, 2.0  # a first request waits 2 s in a queue of 1
    first = threading.Thread(target=create, kwargs=dict(model=run["name"], prompt="Hi",
                                                        max_tokens=2))
    try:
        first.start()
        time.sleep(0.5)
        with pytest.raises(openai.RateLimitError, match="queue is full"):
            create(model=run["name"], prompt="Hi", max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="queues at most 1"):
            create(model=run["name"], prompt="Hi", max_tokens=2, n=2)
    finally:
        first.join(30)
        engine.max_queue, engine.window = 32, 0.01
    service.timeout = 1e-6
    try:
        with pytest.raises(openai.InternalServerError, match="timeout"):
            run["client"].completions.create(model=run["name"], prompt="Hi", max_tokens=2)
    finally:
        service.timeout = 60.0


def post(run, path, body: bytes):
    req = urllib.request.Request(run["server"].url + path, data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_simple_generate_endpoint_and_metrics(run):
    want = expected(run, PROMPTS[2:3])[0]
    status, reply = post(run, "/generate", json.dumps(
        {"prompt": PROMPTS[2], "max_new_tokens": N}).encode())
    assert status == 200
    assert reply == {"prompt": PROMPTS[2], **want}
    assert post(run, "/generate", b'{"prompt": 3}')[0] == 400
    assert metric(run, "deepseek_tf_requests_total") > 5
    assert metric(run, "deepseek_tf_time_to_first_token_seconds_count") > 5
    assert metric(run, "deepseek_tf_tokens_per_second_count") > 0
    assert metric(run, "deepseek_tf_queue_depth") == 0
