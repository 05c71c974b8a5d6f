"""Batched decoding: sequences in one KV store's rows, each at its own exit, give the logits and tokens they give
alone, whatever the other rows do (shallower exits, catch-ups run alone between batched steps, empty rows)."""

import dataclasses
import shutil

import numpy as np
import onnx
import pytest

from balcony_edge.common.checksums import file_sha256
from balcony_edge.common.errors import BalconyError
from balcony_edge.export.graph_builder import GraphBuilder, add_sequence_lengths
from balcony_edge.runtime import Engine
from balcony_edge.runtime.core.manifest import (
    MANIFEST_FILE,
    SEQLENS_K,
    TOTAL_SEQUENCE_LENGTH,
    Manifest,
)

PROMPTS = [[5, 9, 14, 3, 27], [8, 11, 2, 40, 41, 42, 43], [17, 3], [60, 61, 62, 63]]


def as_schema_3(export, folder):
    """A copy of an export as manifest schema 3 wrote it: pieces that take attention_mask and make their sequence
    lengths from it."""
    shutil.copytree(export, folder)
    manifest = Manifest.load(folder)
    for piece in manifest.pieces:
        model = onnx.load(folder / piece.graph, load_external_data=False)
        graph = model.graph
        if SEQLENS_K not in [value.name for value in graph.input]:
            continue
        lengths = GraphBuilder("lengths", np.dtype(np.float32))
        add_sequence_lengths(lengths)
        own = set(lengths.initializers) | {o for n in lengths.nodes for o in n.output if o.startswith("/")}
        for node in lengths.nodes:  # names apart from the piece's own
            node.input[:] = [f"/old{v}" if v in own else v for v in node.input]
            node.output[:] = [f"/old{v}" if v in own else v for v in node.output]
            node.name = f"/old{node.name}"
        for name, tensor in lengths.initializers.items():
            tensor.name = f"/old{name}"
        inputs = [value for value in graph.input if value.name not in (SEQLENS_K, TOTAL_SEQUENCE_LENGTH)]
        nodes = [*lengths.nodes, *graph.node]
        del graph.input[:], graph.node[:]
        graph.input.extend([inputs[0], *lengths.inputs, *inputs[1:]])
        graph.node.extend(nodes)
        graph.initializer.extend(lengths.initializers.values())
        onnx.save(model, folder / piece.graph)
        manifest.files[piece.graph] = file_sha256(folder / piece.graph)
    (folder / MANIFEST_FILE).write_text(dataclasses.replace(manifest, schema_version=3).to_json())
    return folder


@pytest.fixture(scope="module", params=["current", "schema 3"])
def engine(request, tiny_export, tmp_path_factory):
    """The tiny export, and a copy as schema 3 wrote it (its pieces take attention_mask: the engine makes a mask)."""
    old = request.param == "schema 3"
    if old:
        tiny_export = as_schema_3(tiny_export, tmp_path_factory.mktemp("schema3") / "export")
    engine = Engine.load(tiny_export, providers=["cpu"], threads=1)
    attention = [runner for runner in engine.runners.values() if runner.piece.kind != "head"]
    assert all(runner.takes_mask == old and runner.takes_lengths != old for runner in attention)
    return engine


def alone(engine, prompt, schedule):
    """Greedy tokens and logits of one sequence on its own, exit by exit."""
    sequence, tokens, rows = engine.sequence(prompt), [], []
    for exit in schedule:
        logits = sequence.logits(exit)
        rows.append(logits)
        tokens.append(int(np.argmax(logits)))
        sequence.append(tokens[-1])
    return tokens, rows


@pytest.mark.parametrize(
    "schedules",
    [
        [[1] * 6, [2] * 6, [4] * 6],  # each row at its own fixed exit
        [[1, 1, 4, 4, 4, 2, 2], [4, 4, 4, 2, 2, 2, 1], [2, 2, 1, 1, 4, 4, 4]],  # changing: catch-ups run alone
    ],
    ids=["fixed", "switching"],
)
def test_each_row_gets_what_it_gets_alone(engine, schedules):
    batch = engine.batch_decoder(4)  # one row stays empty
    sequences = [engine.sequence(prompt) for prompt in PROMPTS[:3]]
    for sequence in sequences:
        batch.admit(sequence)
    made = [[] for _ in sequences]
    batched_steps = 0
    for step in range(len(schedules[0])):
        ready = [(s, sch[step]) for s, sch in zip(sequences, schedules) if s.ready_for_batch(sch[step])]
        logits = dict(zip((id(s) for s, _ in ready), batch.step(ready))) if len(ready) > 1 else {}
        batched_steps += len(ready) > 1
        for index, (sequence, schedule) in enumerate(zip(sequences, schedules)):
            row = logits.get(id(sequence))
            row = row if row is not None else sequence.logits(schedule[step])
            made[index].append((int(np.argmax(row)), row))
            sequence.append(made[index][-1][0])
    assert batched_steps >= 2
    for index, (prompt, schedule) in enumerate(zip(PROMPTS, schedules)):
        tokens, rows = alone(engine, prompt, schedule)
        assert [t for t, _ in made[index]] == tokens
        np.testing.assert_allclose(np.array([r for _, r in made[index]]), np.array(rows), atol=1e-4)


def test_a_released_sequence_keeps_its_cache_and_a_full_batch_is_refused(engine):
    batch = engine.batch_decoder(2)
    first, second, third = (engine.sequence(p) for p in PROMPTS[:3])
    batch.admit(first)
    batch.admit(second)
    with pytest.raises(BalconyError, match="all 2 rows of the batch are taken"):
        batch.admit(third)
    expected = first.logits(2)
    batch.release(first)
    np.testing.assert_allclose(first.logits(2), expected)
    first.append(7)
    np.testing.assert_allclose(first.logits(4), engine.sequence(PROMPTS[0] + [7]).logits(4), atol=1e-5)
    with pytest.raises(BalconyError, match="one new position"):
        batch.step([(third, 1)])


def test_a_sequence_back_from_a_batch_steps_into_its_new_buffers(engine):
    """Admitted, then released into a new store of its own (which Python may place where the freed first store was):
    its bindings and step plans are made again, so the steps after write the new buffers (a store's identity is a
    number never reused, not its address)."""
    tokens, exit = list(range(5, 20)), engine.exits[-1]
    batch = engine.batch_decoder(2)
    for _ in range(20):
        sequence = engine.sequence(tokens[:5])
        sequence.logits(exit)
        sequence.append(tokens[5])
        sequence.logits(exit)  # a one-token step: the plan of the first store
        batch.admit(sequence)
        batch.release(sequence)
        for token in tokens[6:12]:
            sequence.append(token)
            sequence.logits(exit)
        reference = engine.sequence(tokens[:12])
        reference.logits(exit)
        np.testing.assert_allclose(sequence.cache.keys("layer.0", 12), reference.cache.keys("layer.0", 12), atol=1e-5)


def test_a_sequence_admitted_to_a_batch_keeps_the_room_made_for_its_answer(engine):
    sequence = engine.sequence(list(range(1, 21)))
    sequence.make_room(100)
    room = sequence.cache.capacity
    batch = engine.batch_decoder(2)
    batch.admit(sequence)
    assert sequence.cache.store is batch.store and sequence.cache.capacity >= room >= 120


def test_an_export_of_schema_3_gives_the_logits_of_the_current_one(tiny_export, tmp_path):
    old = Engine.load(as_schema_3(tiny_export, tmp_path / "old"), providers=["cpu"], threads=1)
    new = Engine.load(tiny_export, providers=["cpu"], threads=1)
    schedule = [1, 4, 2, 2, 1, 4]
    tokens, rows = alone(new, PROMPTS[1], schedule)
    assert alone(old, PROMPTS[1], schedule)[0] == tokens
    np.testing.assert_allclose(np.array(alone(old, PROMPTS[1], schedule)[1]), np.array(rows), atol=1e-5)
