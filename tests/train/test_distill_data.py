"""Training throughput and data: distillation over the teacher's top-k tokens, corpora mixed by weight, bf16
detection, the teacher's chat corpus, and the chat-quality check."""

import dataclasses
import json

import pytest
import torch

from balcony_edge.base_model import load_base_model
from balcony_edge.chat_corpus import ChatCorpusConfig, answered_prompts, write_chat_corpus
from balcony_edge.common.errors import DataError
from balcony_edge.data import DEFAULT_CORPUS, Source, WeightedSource, load_corpus, parse_source, weighted_sources
from balcony_edge.distill import distill_backward
from balcony_edge.free_text import FreeTextConfig, write_free_text
from balcony_edge.held_out_prompts import HELD_OUT_PROMPTS
from balcony_edge.precision import cpu_flags, fast_bf16
from balcony_edge.prompts import chat_prompts
from balcony_edge.train import MixedOrder, TrainConfig, Trainer


def _distill(model, hiddens, top_k):
    model.zero_grad(set_to_none=True)
    kl = distill_backward(model.base.lm_head, hiddens.final, hiddens.exits, 1.0, 7, top_k)
    return kl, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_top_k_over_the_whole_vocabulary_is_the_full_distillation(tiny_model):
    ids = torch.randint(0, tiny_model.base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    tiny_model.train()
    full_kl, full_grads = _distill(tiny_model, tiny_model(ids), 0)
    every_kl, every_grads = _distill(tiny_model, tiny_model(ids), tiny_model.base.config.vocab_size)
    few_kl, few_grads = _distill(tiny_model, tiny_model(ids), 3)
    tiny_model.eval()
    assert full_kl == pytest.approx(every_kl, rel=1e-5)
    for name, grad in full_grads.items():
        torch.testing.assert_close(every_grads[name], grad, rtol=1e-4, atol=1e-6)
    assert set(few_grads) == set(full_grads)  # every balcony learns from the top-k loss too
    assert all(0 <= few_kl[k] <= full_kl[k] + 1e-6 for k in full_kl)  # renormalised on fewer tokens: never more


def test_sources_parse_with_and_without_weights(tmp_path):
    assert parse_source("data/chat.jsonl:0.5") == Source("data/chat.jsonl", 0.5)
    assert parse_source("bbc-news") == Source("bbc-news")
    assert parse_source("C:/texts") == Source("C:/texts")  # a colon that is part of the path
    assert weighted_sources(["a", "b"]) is None
    assert weighted_sources(["a:3", "b:1"]) == [WeightedSource("a", 0.75), WeightedSource("b", 0.25)]
    with pytest.raises(DataError, match="every source as PATH:WEIGHT"):
        weighted_sources(["a:1", "b"])
    with pytest.raises(DataError, match="must be a positive number"):
        parse_source("a:-1")


def test_the_default_corpus_can_be_named_beside_other_text(tmp_path):
    (tmp_path / "note.txt").write_text("a note")
    corpus = load_corpus([DEFAULT_CORPUS, tmp_path])
    assert len(corpus.train) + len(corpus.held_out) == 2226


def test_mixed_order_follows_the_weights_and_depends_on_the_position_only():
    order = MixedOrder([10, 90], [0.5, 0.5], seed=3)
    epoch = [order[g] for g in range(100)]
    small = [b for b in epoch if b < 10]
    assert 35 <= len(small) <= 65  # half the draws from the small source, which wraps around
    assert set(small) == set(range(10))  # each of its blocks comes back before any repeats a third time
    again = MixedOrder([10, 90], [0.5, 0.5], seed=3)
    assert [again[g] for g in (150, 7, 99)] == [order[g] for g in (150, 7, 99)]
    assert [order[g] for g in range(100, 200)] != epoch  # a fresh draw each epoch


def test_training_on_a_weighted_mix_runs_and_records_its_data(peaked_base_dir, text_dir, tmp_path):
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"text": f"question {i}? answer {i}. " * 20}) + "\n" for i in range(40)))
    config = TrainConfig(
        exits=(1, 2),
        out=str(tmp_path / "run"),
        base=str(peaked_base_dir),
        data=[f"{text_dir}:0.7", f"{chat}:0.3"],
        seq_len=32,
        batch_size=4,
        micro_batch_size=2,
        max_tokens=4 * 32 * 3,
        precision="fp32",
        distill_top_k=8,
    )
    summary = Trainer(config).run()
    assert summary["steps"] == 3 and summary["distill_top_k"] == 8
    assert summary["data"] == [f"{text_dir}:0.7", f"{chat}:0.3"]


def test_bf16_is_fast_only_with_native_support(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor : 0\nflags : fpu avx2 amx_bf16 avx512f\n")
    assert {"amx_bf16", "avx2"} <= cpu_flags(cpuinfo)
    assert cpu_flags(tmp_path / "absent") == set()
    import balcony_edge.precision as precision

    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "fma"})
    assert not fast_bf16(torch.device("cpu"))
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    assert fast_bf16(torch.device("cpu"))


def test_chat_prompts_are_distinct_and_never_the_held_out_prompts():
    prompts = [p for _, p in chat_prompts(10_000)]
    assert len(prompts) == len(set(prompts)) > 2000
    assert not set(prompts) & set(HELD_OUT_PROMPTS)
    assert chat_prompts(5, seed=1) == chat_prompts(5, seed=1) != chat_prompts(5, seed=2)


def test_the_teacher_writes_a_chat_corpus_that_training_reads(tiny_base_dir, tmp_path):
    out = tmp_path / "chat.jsonl"
    config = ChatCorpusConfig(base=str(tiny_base_dir), prompts=5, max_new_tokens=6, batch_size=2)
    assert write_chat_corpus(config, out) == 5
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 5 and [p.name for p in tmp_path.iterdir()] == ["chat.jsonl"]
    for record in records:
        assert record["text"].startswith("<|im_start|>") and record["prompt"] in record["text"]
        assert record["generation"]["max_new_tokens"] == 6 and record["generation"]["temperature"] == 0.7
    assert load_corpus([out]).train  # training reads it as a JSONL corpus
    with pytest.raises(DataError, match="must end in .jsonl"):
        write_chat_corpus(config, tmp_path / "chat.txt")
    # --exclude: a second corpus draws none of the first one's prompts
    more = tmp_path / "more.jsonl"
    assert write_chat_corpus(dataclasses.replace(config, prompts=4, exclude=str(out)), more) == 4
    again = {json.loads(line)["prompt"] for line in more.read_text().splitlines()}
    assert len(again) == 4 and not again & {r["prompt"] for r in records}
    assert all(json.loads(line)["generation"]["exclude"] == str(out) for line in more.read_text().splitlines())


def test_the_teacher_writes_free_text_that_training_reads(tiny_base_dir, tmp_path):
    out = tmp_path / "free.jsonl"
    config = FreeTextConfig(base=str(tiny_base_dir), samples=5, max_new_tokens=8, batch_size=2, seed=3)
    written = write_free_text(config, out)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert written == len(records) and 1 <= written <= 5 and [p.name for p in tmp_path.iterdir()] == ["free.jsonl"]
    assert all(
        r["text"] and r["generation"]["start"] == "<|endoftext|>" and r["generation"]["temperature"] == 1.0
        for r in records
    )
    assert len({r["text"] for r in records}) > 1  # sampled, not one text five times
    assert load_corpus([out]).train
    write_free_text(config, again := tmp_path / "again.jsonl")
    assert again.read_text() == out.read_text()  # the seed decides every sample
    with pytest.raises(DataError, match="must end in .jsonl"):
        write_free_text(config, tmp_path / "free.txt")
    with pytest.raises(DataError, match="--max-minutes must be a positive number"):
        write_free_text(config, tmp_path / "free.jsonl", max_minutes=0)
    # a start of plain text begins every record's text
    plain = dataclasses.replace(config, start="The river")
    write_free_text(plain, story := tmp_path / "story.jsonl")
    assert all(json.loads(line)["text"].startswith("The river") for line in story.read_text().splitlines())


def test_free_text_stops_at_the_document_start_and_drops_empty_samples(tiny_base_dir, tmp_path, monkeypatch):
    import balcony_edge.teacher_sampling as teacher_sampling

    seen = {}

    def generate(self, **kwargs):  # the model ends at once: every sample is empty
        seen["eos"] = kwargs["eos_token_id"]
        return kwargs["input_ids"]

    config = FreeTextConfig(base=str(tiny_base_dir), samples=3, max_new_tokens=4, batch_size=3)
    real_load = teacher_sampling.Teacher.load

    def load(base):
        teacher = real_load(base)
        monkeypatch.setattr(type(teacher.model), "generate", generate)
        return teacher

    monkeypatch.setattr(teacher_sampling.Teacher, "load", staticmethod(load))
    assert write_free_text(config, tmp_path / "free.jsonl") == 0 and (tmp_path / "free.jsonl").read_text() == ""
    tokenizer = load_base_model(str(tiny_base_dir)).tokenizer
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") in seen["eos"] and tokenizer.eos_token_id in seen["eos"]


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: FreeTextConfig(samples=0), "--samples must be an integer of at least 1, not 0"),
        (lambda: FreeTextConfig(samples=True), "--samples must be an integer of at least 1, not True"),
        (lambda: ChatCorpusConfig(prompts=0), "--prompts must be an integer of at least 1, not 0"),
        (lambda: ChatCorpusConfig(batch_size=-2), "--batch-size must be an integer of at least 1, not -2"),
        (lambda: FreeTextConfig(seed=-1), "--seed must be an integer of at least 0, not -1"),
        (lambda: FreeTextConfig(top_p=0), r"--top-p must be in \(0, 1\], not 0"),
        (lambda: ChatCorpusConfig(temperature=0), r"--temperature must be in \(0, 10\], not 0"),
        (lambda: FreeTextConfig(start=" "), "--start is empty"),
    ],
)
def test_teacher_corpus_configs_refuse_bad_values_in_one_line(make, words):
    with pytest.raises(DataError, match=words):
        make()
    assert FreeTextConfig(seed=0).seed == 0


def test_chat_prompts_exclude_and_a_malformed_exclude_file(tmp_path):
    every = {p for _, p in chat_prompts(10_000)}
    some = frozenset(sorted(every)[:100])
    assert {p for _, p in chat_prompts(10_000, exclude=some)} == every - some
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"text": "no prompt"}\n')
    with pytest.raises(DataError, match="bad.jsonl:2 is not a chat-data record with a prompt"):
        answered_prompts(bad)
    with pytest.raises(DataError, match="cannot read --exclude"):
        answered_prompts(tmp_path / "absent.jsonl")


def test_chat_data_closes_turns_by_the_template_whatever_the_tokenizer_names_its_tokens(
    tiny_base_dir, tmp_path, monkeypatch
):
    import balcony_edge.teacher_sampling as teacher_sampling

    real = teacher_sampling.load_base_model

    def as_converted_by_transformers_5_17(spec):  # no pad token, and <|im_start|> named as eos_token
        base = real(spec)
        base.tokenizer.pad_token = None
        base.tokenizer.eos_token = "<|im_start|>"
        return base

    monkeypatch.setattr(teacher_sampling, "load_base_model", as_converted_by_transformers_5_17)
    config = ChatCorpusConfig(base=str(tiny_base_dir), prompts=3, max_new_tokens=4, batch_size=3)
    assert write_chat_corpus(config, tmp_path / "chat.jsonl") == 3
    for line in (tmp_path / "chat.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert record["text"].endswith(record["answer"] + "<|im_end|>\n")


def test_a_non_utf8_exclude_file_is_a_one_line_error_before_the_model_loads(tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    config = ChatCorpusConfig(base="no-such-model", prompts=3, exclude=str(bad))
    with pytest.raises(DataError, match="is not UTF-8 text"):
        write_chat_corpus(config, tmp_path / "chat.jsonl")
