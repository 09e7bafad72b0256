"""passn.weight_push on the CPU: a snapshot (not the live parameters), tied weights once, packed
into buckets, and what crosses a process boundary (a pickle) holds the handles, never the trainer's
own copies."""

import pickle

import pytest
import torch

from passn.config import TinyModelSpec
from passn.models import build_tiny_model
from passn.weight_push import SharedWeights


def test_a_snapshot_in_the_engines_dtype_that_later_steps_do_not_change():
    model, _ = build_tiny_model(TinyModelSpec(), seed=0)
    shared = SharedWeights.of(model, torch.bfloat16)
    names = [n for n, _ in model.named_parameters()]
    assert shared.names == names and not shared.cuda
    assert shared.nbytes == sum(p.numel() * 2 for p in model.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the trainer steps on
    received = pickle.loads(pickle.dumps(shared))  # as Ray sends it to a sampler actor
    assert received.keep == [] and len(received.names) == len(names)
    for (name, tensor), (_, live) in zip(received.tensors(), model.named_parameters()):
        assert tensor.dtype == torch.bfloat16
        # the weights as they were when pushed (bf16-rounded), one step behind the live ones
        assert torch.allclose(tensor.float() + 1.0, live.detach().float(), atol=0.01), name
    assert str(shared).endswith("in 1 bucket in memory")


def test_weights_packed_into_buckets_come_back_whole_and_named():
    model, _ = build_tiny_model(TinyModelSpec(), seed=0)
    sizes = [p.numel() * 4 for p in model.parameters()]
    bucket = 3 * max(sizes)  # several buckets; a weight is never split across two
    shared = SharedWeights.of(((n, p) for n, p in model.named_parameters()), torch.float32, bucket_bytes=bucket)
    assert 1 < len(shared.buckets) <= sum(sizes) // max(sizes)
    assert all(b.numel() * 4 <= bucket for b in shared.buckets)
    received = dict(pickle.loads(pickle.dumps(shared)).tensors())
    assert list(received) == [n for n, _ in model.named_parameters()]
    for name, live in model.named_parameters():
        assert received[name].shape == live.shape and torch.equal(received[name], live.detach()), name
    one = SharedWeights.of([("w", torch.ones(10))], torch.float32, bucket_bytes=4)  # larger than a bucket
    assert len(one.buckets) == 1 and torch.equal(dict(one.tensors())["w"], torch.ones(10))


def _engine_side(port: int, rank: int, world: int, shared_bytes: bytes, out) -> None:
    """An engine's process: joins the group, receives the buckets while reading the weights."""
    from passn.weight_push import WeightGroup

    group = WeightGroup("127.0.0.1", port, rank, world, "gloo", timeout_s=30).connect()
    shared = pickle.loads(shared_bytes)
    out.put({name: tensor.numpy().copy() for name, tensor in shared.tensors(group)})  # not shared memory


def test_weights_broadcast_over_a_process_group_reach_every_engine_whole():
    """by_group: what is pickled is the layout alone (no tensor); two engine processes receive every
    bucket (gloo, as between the CPU processes of a sampler pool) and read the snapshot exactly."""
    import multiprocessing

    from passn.weight_push import WeightGroup

    model, _ = build_tiny_model(TinyModelSpec(), seed=0)
    sizes = [p.numel() * 4 for p in model.parameters()]
    shared = SharedWeights.of(model, torch.float32, bucket_bytes=3 * max(sizes), by_group=True)
    assert len(shared.keep) > 1 and shared.buckets == [] and str(shared).endswith("in a process group")
    sent = pickle.dumps(shared)
    assert len(sent) < 20_000  # names, shapes and places: no weights
    group = WeightGroup("127.0.0.1", 0, 0, 3, "gloo", timeout_s=30)
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    engines = [context.Process(target=_engine_side, args=(group.port, rank, 3, sent, out)) for rank in (1, 2)]
    for engine in engines:
        engine.start()
    try:
        group.connect()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # the trainer steps on: the engines get the snapshot
        group.send(shared)
        received = [out.get(timeout=60), out.get(timeout=60)]
    finally:
        for engine in engines:
            engine.join(timeout=30)
        group.close()
    for weights in received:
        assert list(weights) == [n for n, _ in model.named_parameters()]
        for name, live in model.named_parameters():
            assert torch.equal(torch.from_numpy(weights[name]) + 1.0, live.detach()), name
    with pytest.raises(ValueError, match="need the group"):
        next(pickle.loads(sent).tensors())


def test_a_weight_group_whose_engine_died_fails_within_its_timeout():
    """An engine that never joins: the sender's connect fails past the timeout instead of waiting."""
    import time

    from passn.weight_push import WeightGroup

    group = WeightGroup("127.0.0.1", 0, 0, 2, "gloo", timeout_s=2)
    start = time.monotonic()
    with pytest.raises(RuntimeError):
        group.connect()
    assert time.monotonic() - start < 30
    group.close()
