"""Every parameter the server accepts changes what it should: sampling knobs against the engine with the same
settings, n choices, log-probabilities in OpenAI's shapes, ignore_eos, model names that pin an exit, aliases,
/tokenize and /detokenize, and a non-streaming client that leaves."""

import dataclasses
import json
import math
import time

import httpx
import numpy as np
import pytest
from serving_helpers import HELLO, MODEL, LiveServer, make_app, sse_events
from starlette.testclient import TestClient

from balcony_edge.runtime import Engine, SamplingConfig
from balcony_edge.runtime.core.sequence import Sequence


@pytest.fixture(scope="module")
def engine(tiny_export):
    return Engine.load(tiny_export, providers=["cpu"], threads=1)


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(make_app(engine, aliases=("llama3",))) as client:
        yield client


def ask(client, **settings) -> dict:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 8, "budget": "full"} | settings
    answer = client.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()


def text_of(result: dict, index: int = 0) -> str:
    return result["choices"][index]["message"]["content"]


def engine_text(engine, sampling: SamplingConfig, tokens: int = 8) -> str:
    return "".join(t.text for t in engine.generate(engine.prompt_ids(HELLO), tokens, "full", sampling))


@pytest.mark.parametrize(
    "knob, config",
    [
        ({"temperature": 1.3, "seed": 4}, SamplingConfig(temperature=1.3, seed=4)),
        ({"temperature": 1.3, "top_k": 3, "seed": 4}, SamplingConfig(temperature=1.3, top_k=3, seed=4)),
        ({"temperature": 1.3, "top_p": 0.5, "seed": 4}, SamplingConfig(temperature=1.3, top_p=0.5, seed=4)),
        ({"temperature": 1.3, "min_p": 0.2, "seed": 4}, SamplingConfig(temperature=1.3, min_p=0.2, seed=4)),
        ({"repeat_penalty": 5.0}, SamplingConfig(repetition_penalty=5.0)),
        ({"repetition_penalty": 5.0}, SamplingConfig(repetition_penalty=5.0)),
        ({"presence_penalty": 2.0}, SamplingConfig(presence_penalty=2.0)),
        ({"frequency_penalty": 2.0}, SamplingConfig(frequency_penalty=2.0)),
    ],
)
def test_each_sampling_knob_gives_what_the_engine_gives_with_it(client, engine, knob, config):
    assert text_of(ask(client, **knob)) == engine_text(engine, config)


def test_the_knobs_change_the_answer(client):
    greedy = text_of(ask(client, temperature=0))
    assert text_of(ask(client, temperature=2.0, top_k=1, seed=1)) == greedy  # top_k 1 is greedy at any temperature
    assert text_of(ask(client, temperature=2.0, min_p=0.999, seed=1)) == greedy
    hot = {text_of(ask(client, temperature=2.0, seed=seed)) for seed in range(4)}
    assert len(hot) > 1 and text_of(ask(client, temperature=2.0, seed=7)) == text_of(
        ask(client, temperature=2.0, seed=7)
    )
    assert (
        text_of(ask(client, repetition_penalty=20.0)) != greedy or text_of(ask(client, frequency_penalty=2.0)) != greedy
    )


def test_n_choices_each_with_its_own_seed_and_usage_counting_all(client, engine):
    result = ask(client, n=3, temperature=1.5, seed=10)
    assert [c["index"] for c in result["choices"]] == [0, 1, 2]
    for index in range(3):
        assert text_of(result, index) == engine_text(engine, SamplingConfig(temperature=1.5, seed=10 + index))
    counted = sum(sum(c["balcony"]["tokens_per_exit"].values()) for c in result["choices"])
    assert result["usage"]["completion_tokens"] == counted
    streamed = client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": HELLO, "max_tokens": 4, "n": 2, "stream": True, "temperature": 0},
    )
    indices = {c["choices"][0]["index"] for c in _events(streamed.text)}
    assert indices == {0, 1}


def _events(text):
    from serving_helpers import sse_events

    return sse_events(text)


def test_chat_logprobs_are_the_exits_own_log_probabilities_in_openai_shape(client, engine):
    result = ask(client, temperature=0, logprobs=True, top_logprobs=3)
    content = result["choices"][0]["logprobs"]["content"]
    assert len(content) == result["usage"]["completion_tokens"]
    sequence = engine.sequence(engine.prompt_ids(HELLO))
    logits = sequence.logits(engine.exits[-1]).astype(np.float64)
    log_probs = logits - logits.max() - math.log(np.exp(logits - logits.max()).sum())
    first = content[0]
    best = int(np.argmax(log_probs))
    assert first["token"] == engine.codec.token_text(best) and first["logprob"] == pytest.approx(log_probs[best])
    assert first["bytes"] == list(first["token"].encode("utf-8"))
    tops = [t["logprob"] for t in first["top_logprobs"]]
    assert len(tops) == 3 and tops == sorted(tops, reverse=True) and tops[0] == pytest.approx(first["logprob"])
    assert ask(client, temperature=0)["choices"][0]["logprobs"] is None


def test_completion_logprobs_list_tokens_offsets_and_alternatives(client):
    body = {"model": MODEL, "prompt": "The harbour was", "max_tokens": 4, "temperature": 0, "logprobs": 2}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["text_offset"]) == 4
    assert all(len(alternatives) == 2 for alternatives in logprobs["top_logprobs"])
    assert logprobs["text_offset"][0] == 0 and all(lp <= 0 for lp in logprobs["token_logprobs"])


def test_ignore_eos_writes_on_past_the_end_token(engine, tiny_export):
    first = next(engine.generate(engine.prompt_ids(HELLO), 1, "full", SamplingConfig())).id
    eos_first = Engine.load(tiny_export, providers=["cpu"], threads=1)
    generation = dataclasses.replace(eos_first.manifest.generation, eos_token_ids=[first])
    eos_first.manifest = dataclasses.replace(eos_first.manifest, generation=generation)
    with TestClient(make_app(eos_first)) as client:
        stopped = ask(client, temperature=0)
        assert stopped["usage"]["completion_tokens"] == 1 and stopped["choices"][0]["finish_reason"] == "stop"
        going = ask(client, temperature=0, ignore_eos=True)
        assert going["usage"]["completion_tokens"] == 8 and going["choices"][0]["finish_reason"] == "length"


def test_a_model_name_with_an_exit_tag_pins_that_exit_and_an_alias_answers(client, engine):
    shallow = engine.exits[0]
    result = ask(client, model=f"{MODEL}:exit-{shallow}", budget=None)
    assert set(result["choices"][0]["balcony"]["tokens_per_exit"]) == {str(shallow)}
    assert ask(client, model="llama3")["model"] == "llama3"
    assert ask(client, model=f"llama3:exit-{shallow}", budget=None)["choices"][0]["balcony"]["exit"] == shallow


def test_tokenize_and_detokenize_round_trip_in_llama_servers_shape(client, engine):
    ids = client.post("/tokenize", json={"content": "The harbour was quiet."}).json()["tokens"]
    assert ids == engine.codec.encode("The harbour was quiet.")
    pieces = client.post("/tokenize", json={"content": "The harbour", "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == engine.codec.encode("The harbour")
    assert client.post("/detokenize", json={"tokens": ids}).json() == {"content": "The harbour was quiet."}
    assert client.post("/detokenize", json={"tokens": [10**9]}).status_code == 400
    assert (
        client.post("/tokenize", json={"content": "x", "frobnicate": 1}).json()["error"]["code"] == "unknown_parameter"
    )


def test_a_non_streaming_client_that_leaves_frees_its_slot_at_the_next_token(engine, monkeypatch):
    real_logits = Sequence.logits

    def slow_logits(self, exit, every_position=False):  # 10 ms a token: 500 tokens would hold the slot 5 s
        time.sleep(0.01)
        return real_logits(self, exit, every_position)

    monkeypatch.setattr(Sequence, "logits", slow_logits)
    app = make_app(engine, parallel=1, queue_limit=0)
    body = {"model": MODEL, "prompt": "The harbour", "max_tokens": 5000, "ignore_eos": True, "temperature": 0}
    with LiveServer(app) as live:
        with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=live.url, timeout=0.3) as http:
            http.post("/v1/completions", json=body)
        scheduler = app.state.scheduler
        deadline = time.monotonic() + 1.0
        while scheduler.depth != (0, 0) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert scheduler.depth == (0, 0)


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_json_schema_output_parses_and_matches_through_the_openai_client(engine):
    openai = pytest.importorskip("openai")
    pytest.importorskip("llguidance")
    with LiveServer(make_app(engine, parallel=2)) as live:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused")
        for temperature in (0.0, 1.2):
            answer = client.chat.completions.create(
                model=MODEL,
                messages=HELLO,
                max_tokens=60,
                temperature=temperature,
                seed=5,
                response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
            )
            person = json.loads(answer.choices[0].message.content)
            assert set(person) == {"name", "age"} and isinstance(person["name"], str) and 0 <= person["age"] <= 120
        with pytest.raises(openai.BadRequestError, match="cannot be compiled"):
            client.chat.completions.create(
                model=MODEL,
                messages=HELLO,
                response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/no"}}},
            )
    with TestClient(make_app(engine)) as client:
        body = {"model": MODEL, "messages": HELLO, "max_tokens": 400, "response_format": {"type": "json_object"}}
        result = client.post("/v1/chat/completions", json=body).json()
        text = result["choices"][0]["message"]["content"]
        assert text.startswith("{") and (result["choices"][0]["finish_reason"] == "length" or json.loads(text))


DEAD_END = {  # `{"a":` can be written, and then no value fits: the grammar has only the end of the answer left
    "type": "object",
    "properties": {"a": {"$ref": "#/$defs/a"}},
    "required": ["a"],
    "$defs": {"a": {"$ref": "#/$defs/a"}},
}


def requests_counted(client, status: str) -> float:
    line = f'balcony_requests_total{{endpoint="/v1/chat/completions",status="{status}"}} '
    found = [row for row in client.get("/metrics").text.splitlines() if row.startswith(line)]
    return float(found[0].split()[-1]) if found else 0.0


def test_a_grammar_dead_end_mid_answer_is_a_400_whole_or_streamed_and_each_request_is_counted_once(engine):
    pytest.importorskip("llguidance")
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 20, "temperature": 0}
    dead_end = {"type": "json_schema", "json_schema": {"schema": DEAD_END}}
    with TestClient(make_app(engine), raise_server_exceptions=False) as client:
        whole = client.post("/v1/chat/completions", json=body | {"response_format": dead_end})
        assert whole.status_code == 400 and "matches no complete value" in whole.json()["error"]["message"]
        streamed = client.post("/v1/chat/completions", json=body | {"response_format": dead_end, "stream": True})
        events = sse_events(streamed.text)
        assert "matches no complete value" in events[-1]["error"]["message"]  # then [DONE]
        assert client.post("/v1/chat/completions", json=body | {"stream": True}).status_code == 200
        assert requests_counted(client, "400") == 2 and requests_counted(client, "200") == 1
        assert requests_counted(client, "500") == 0


def test_json_object_with_a_schema_follows_it_as_llama_server_does(client):
    pytest.importorskip("llguidance")
    schema = {"type": "integer", "minimum": 3, "maximum": 7}
    answer = ask(client, response_format={"type": "json_object", "schema": schema}, max_tokens=10)
    assert 3 <= json.loads(text_of(answer)) <= 7


@pytest.mark.parametrize("body", [{"content": "hi", "with_pieces": "yes"}, {"content": "\ud800"}])
def test_tokenize_refuses_a_wrong_type_and_broken_unicode_with_a_400(client, body):
    answer = client.post("/tokenize", content=json.dumps(body))
    assert answer.status_code == 400 and answer.json()["error"]["message"], answer.text


def test_a_growing_conversation_reuses_its_prompt_and_answers_as_a_fresh_server_would(engine):
    turns = [{"role": "user", "content": "Tell me about the harbour."}]
    with TestClient(make_app(engine)) as warm, TestClient(make_app(engine, prompt_cache=0)) as cold:
        first = ask(warm, messages=turns, temperature=0, max_tokens=6)
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        turns += [{"role": "assistant", "content": text_of(first)}, {"role": "user", "content": "And the boats?"}]
        second = ask(warm, messages=turns, temperature=0, max_tokens=6)
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16
        assert text_of(second) == text_of(ask(cold, messages=turns, temperature=0, max_tokens=6))
        assert ask(warm, messages=turns, max_tokens=2, cache_prompt=False)["usage"]["prompt_tokens_details"] == {
            "cached_tokens": 0
        }
        metrics = warm.get("/metrics").text
        assert (
            "balcony_prefix_cache_hits_total 1.0" in metrics and "balcony_prefix_cache_reused_tokens_total" in metrics
        )


def test_concurrent_requests_at_their_own_exits_answer_as_each_would_alone(engine):
    import concurrent.futures

    exits = [engine.exits[0], engine.exits[-1], engine.exits[1], engine.exits[0]]
    app = make_app(engine, parallel=4)
    alone = [
        "".join(
            t.text for t in engine.generate(engine.prompt_ids(HELLO), 24, str(exit), SamplingConfig(), ignore_eos=True)
        )
        for exit in exits
    ]
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=60) as http:

        def ask_at(exit):
            body = {"model": f"{MODEL}:exit-{exit}", "messages": HELLO, "max_tokens": 24, "temperature": 0}
            return http.post("/v1/chat/completions", json=body | {"ignore_eos": True}).json()

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(ask_at, exits))
        batched = http.get("/metrics").text
    assert "balcony_batch_size_count" in batched and "balcony_batch_size_count 0.0" not in batched
    assert [a["choices"][0]["message"]["content"] for a in answers] == alone
    assert [a["choices"][0]["balcony"]["tokens_per_exit"] for a in answers] == [{str(e): 24} for e in exits]
