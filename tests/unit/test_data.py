"""passn.data: encoding, batches, the candidate stream and batch refill."""

import types

import pytest
import torch

from passn.config import TinyModelSpec
from passn.data import CandidateStream, collate, encode_examples, refill
from passn.models import EOS_ID, PAD_ID, char_tokenizer
from passn.tasks import SYNTHETIC_ALPHABET, SyntheticTask


def test_refill_keeps_in_order_and_stops_at_the_need():
    # weights:         0     1     2     3     4     5
    outcome = refill([0.5, 0.001, 0.2, 0.002, 0.9, 0.7], threshold=0.01, need=3)
    # keeps 0, 2, 4; candidate 5 is not consumed (the next round sees it again); dropped 1 and 3
    assert outcome.chosen == [0, 2, 4]
    assert outcome.consumed == 5 and outcome.dropped == 2


def test_refill_consumes_everything_when_short():
    outcome = refill([0.5, 0.0, 0.0], threshold=0.1, need=3)
    assert outcome.chosen == [0] and outcome.consumed == 3 and outcome.dropped == 2
    assert refill([1.0, 1.0], threshold=0.0, need=2).consumed == 2


def test_stream_positions_cross_epochs():
    stream = CandidateStream(size=5, epochs=2, seed=3)
    first, second = stream.order(0).tolist(), stream.order(1).tolist()
    assert sorted(first) == sorted(second) == [0, 1, 2, 3, 4] and first != second
    stream.advance(4)
    assert stream.peek(3) == [first[4], second[0], second[1]]  # runs into the next epoch
    stream.advance(3)
    assert stream.state() == {"epoch": 1, "cursor": 2} and stream.progress == pytest.approx(1.4)
    assert len(stream.peek(10)) == 3  # only the last epoch's rest
    stream.advance(3)
    assert stream.finished


def test_encoding_and_collate_masks_only_the_completion():
    task = SyntheticTask(seed=0, num_train=4, num_test=1)
    tokenizer = char_tokenizer(SYNTHETIC_ALPHABET)
    [example] = encode_examples(tokenizer, task, task.problems("train")[:1], max_length=64)
    # <bos> + 6 letters + '=' then 2 digits + <eos>: 11 tokens, completion starting at index 8
    assert len(example.input_ids) == 11 and example.completion_start == 8
    assert example.input_ids[-1] == EOS_ID
    batch = collate([example], PAD_ID)
    assert batch["inputs_BT"].shape == (1, 10)
    assert torch.equal(batch["targets_BT"][0], torch.tensor(example.input_ids[1:]))
    # targets 7, 8, 9 (digit, digit, <eos>) carry the loss: the three answer tokens of TOY.md
    assert batch["mask_BT"][0].tolist() == [0] * 7 + [1, 1, 1]


def test_encoding_errors_name_the_problem():
    task = SyntheticTask(seed=0, num_train=2, num_test=1)
    tokenizer = char_tokenizer("abc")  # no '=' and no digits
    with pytest.raises(ValueError, match="synthetic-0-0: cannot tokenise"):
        encode_examples(tokenizer, task, task.problems("train"), max_length=64)
    with pytest.raises(ValueError, match="exceed the model's limit of 5"):
        encode_examples(char_tokenizer(SYNTHETIC_ALPHABET), task, task.problems("train"), max_length=5)


def test_char_tokenizer_round_trips_through_save_and_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = char_tokenizer(SYNTHETIC_ALPHABET)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    ids = loaded("abc=12").input_ids
    assert ids == [1, 14, 15, 16, 3, 5, 6]  # TOY.md's ids: <bos> 1, a 14, '=' 3, '1' 5
    assert loaded.decode(ids, skip_special_tokens=True) == "abc=12"
    assert len(loaded) == 40 and TinyModelSpec().alphabet == "synthetic"


def test_a_folder_whose_tokenizer_has_no_pad_token_pads_with_its_end_of_sequence_token(tmp_path):
    """Llama 3 and Qwen base folders, and SmolLM2 as some transformers releases convert it, name no
    pad token: training, evaluation and the samplers pad with the end-of-sequence token instead (the
    GPU demo once failed in its first evaluation on ``torch.full(..., None)``)."""
    from transformers import AutoTokenizer

    from passn.config import ModelConfig
    from passn.models import hf_tokenizer, load_tokenizer, tiny_llama_config

    tokenizer = char_tokenizer(SYNTHETIC_ALPHABET)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path / "model")
    tiny_llama_config(TinyModelSpec(), len(tokenizer)).save_pretrained(tmp_path / "model")
    assert AutoTokenizer.from_pretrained(tmp_path / "model").pad_token_id is None  # the premise

    loaded, limit = load_tokenizer(ModelConfig(path=str(tmp_path / "model")))
    assert loaded.pad_token_id == loaded.eos_token_id == EOS_ID and limit == TinyModelSpec().max_position_embeddings
    task = SyntheticTask(seed=0, num_train=4, num_test=1)
    examples = encode_examples(loaded, task, task.problems("train")[:2], max_length=64)
    assert collate(examples, loaded.pad_token_id)["inputs_BT"].dtype == torch.long

    tokenizer.eos_token = None
    tokenizer.save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match="neither a pad token nor an end-of-sequence token"):
        hf_tokenizer(str(tmp_path / "bare"))


def test_a_conversion_takes_the_special_tokens_from_the_model_config():
    """transformers 5.17 converts SmolLM2's GGUF tokenizer with <|im_start|> as its end token and no
    pad, while the model's config (from the file's metadata) says <|im_end|>: the config wins."""
    from passn.models import BOS_ID
    from passn.pretrained import special_tokens_from_config

    tokenizer = char_tokenizer(SYNTHETIC_ALPHABET)
    tokenizer.eos_token, tokenizer.pad_token = "<bos>", None  # what the faulty reader leaves
    config = types.SimpleNamespace(bos_token_id=BOS_ID, eos_token_id=[EOS_ID, 7], pad_token_id=None)
    special_tokens_from_config(tokenizer, config)
    assert tokenizer.eos_token_id == EOS_ID and tokenizer.bos_token_id == BOS_ID
    assert tokenizer.pad_token_id == EOS_ID  # no pad id in the config: the end token pads
    config.pad_token_id = PAD_ID
    special_tokens_from_config(tokenizer, config)
    assert tokenizer.pad_token_id == PAD_ID
