"""SFT data: assistant-only loss masks, packing with segment ids, JSONL errors, and fine-tuning
a (tiny) pretrained model through the trainer."""

import json
import pathlib
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from train import sft

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "infer"))
from tiny_lm import byte_tokenizer, tiny_lm  # noqa: E402

CONVERSATIONS = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Who wrote Hamlet?"},
        {"role": "assistant", "content": "Shakespeare."},
    ],
    [
        {"role": "user", "content": "Two turns?"},
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "Quite sure."},
    ],
]


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def test_mask_covers_exactly_the_assistant_replies(tokenizer):
    ids, mask = sft.tokenize_conversation(tokenizer, CONVERSATIONS[1])
    assert ids.tolist() == tokenizer.apply_chat_template(
        CONVERSATIONS[1], add_generation_prompt=False
    )
    # The masked tokens are the two replies, each with the end-of-turn token the template writes.
    runs = np.split(ids[mask], np.flatnonzero(np.diff(np.flatnonzero(mask)) > 1) + 1)
    texts = [tokenizer.decode(r.tolist(), skip_special_tokens=False) for r in runs]
    assert texts == ["Yes.</s>", "Quite sure.</s>"]
    # Nothing of the system/user turns or the assistant headers is masked.
    unmasked = tokenizer.decode(ids[~mask].tolist(), skip_special_tokens=False)
    assert "Two turns?" in unmasked and "Yes." not in unmasked


def test_pack_examples_segments_positions_and_weights(tokenizer):
    examples = [sft.tokenize_conversation(tokenizer, c) for c in CONVERSATIONS * 3]
    seq_len = 96
    packed = sft.pack_examples(examples, seq_len, pad_id=0)
    assert packed.inputs.shape[1] == seq_len and packed.num_examples == len(examples)
    assert packed.num_truncated == sum(len(ids) > seq_len + 1 for ids, _ in examples)
    # Every example's next-token pairs appear intact, in its own segment, from position 0.
    found = 0
    for r in range(len(packed.inputs)):
        for s in range(1, packed.segment_ids[r].max() + 1):
            where = packed.segment_ids[r] == s
            ids, mask = examples[found]
            n = min(len(ids), seq_len + 1) - 1
            np.testing.assert_array_equal(packed.inputs[r][where], ids[:n])
            np.testing.assert_array_equal(packed.targets[r][where], ids[1 : n + 1])
            np.testing.assert_array_equal(packed.weights[r][where], mask[1 : n + 1])
            np.testing.assert_array_equal(packed.positions[r][where], np.arange(n))
            found += 1
    assert found == len(examples)
    assert not packed.weights[packed.segment_ids == 0].any()  # padding never counts


def test_packed_examples_do_not_attend_to_each_other(tokenizer):
    """A packed row gives each example the logits it gets alone."""
    lm = tiny_lm()
    short = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    examples = [sft.tokenize_conversation(tokenizer, c) for c in (CONVERSATIONS[0], short)]
    packed = sft.pack_examples(examples, 150, pad_id=0)
    assert packed.segment_ids[0].max() == 2  # both in one row
    logits = lm.model(
        packed.inputs[:1], positions=packed.positions[:1], segment_ids=packed.segment_ids[:1]
    )
    for s, (ids, _) in enumerate(examples, 1):
        alone = lm.model(ids[None, :-1])
        where = packed.segment_ids[0] == s
        np.testing.assert_allclose(logits[0][where], alone[0], rtol=1e-5, atol=1e-5)


def test_a_token_outside_assistant_turns_never_contributes(tokenizer):
    """Changing the user/system targets leaves the loss and its gradient unchanged."""
    from train.trainer import cross_entropy

    lm = tiny_lm()
    packed = sft.pack_examples([sft.tokenize_conversation(tokenizer, CONVERSATIONS[0])], 64)
    graphdef, params = nnx.split(lm.model, nnx.Param)

    def loss(params, targets):
        logits = nnx.merge(graphdef, params)(
            packed.inputs, positions=packed.positions, segment_ids=packed.segment_ids
        )
        return cross_entropy(logits, targets, packed.weights, 0.0)[0]

    other = np.where(packed.weights > 0, packed.targets, (packed.targets + 7) % 256)
    assert (other != packed.targets).any()
    (a, ga), (b, gb) = (jax.value_and_grad(loss)(params, t) for t in (packed.targets, other))
    assert float(a) == float(b)
    jax.tree.map(np.testing.assert_array_equal, ga, gb)


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ('{"messages": []}', "non-empty list"),
        ('{"messages": [{"role": "user"}]}', "no string 'content'"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "chat.jsonl"
    good = json.dumps({"messages": CONVERSATIONS[0]})
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(sft.SFTDataError, match=f"chat.jsonl:2: .*{message}"):
        sft.load_chat_jsonl(path)


def test_jsonl_round_trip(tmp_path):
    path = tmp_path / "d" / "chat.jsonl"
    sft.write_chat_jsonl(path, CONVERSATIONS)
    assert sft.load_chat_jsonl(path) == CONVERSATIONS


def test_loss_at_gathered_positions_equals_the_full_loss(tokenizer):
    """The compact batch (logits only where the loss counts) gives the full batch's loss."""
    from train.trainer import cross_entropy, forward

    lm = tiny_lm()
    examples = [sft.tokenize_conversation(tokenizer, c) for c in CONVERSATIONS]
    packed = sft.pack_examples(examples, 150, pad_id=0)
    compact = packed.loss_positions()
    assert compact["targets"].shape[1] % 8 == 0 < compact["targets"].shape[1] < 150
    full = cross_entropy(forward(lm.model, packed.as_dict()), packed.targets, packed.weights, 0.0)
    small = cross_entropy(forward(lm.model, compact), compact["targets"], compact["weights"], 0.0)
    np.testing.assert_allclose(full[1], small[1], rtol=1e-6)
    assert float(full[2]) == float(small[2]) == packed.weights.sum()
