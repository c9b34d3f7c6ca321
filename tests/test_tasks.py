"""Tests for the synthetic tasks, each against an oracle written independently of the
generators: plain-Python per-example rule checkers, counting, and row-set comparisons."""

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tasks

NOOP, COPY = 0, 1  # the documented ids, restated so a silent renumbering fails the tests
# The paper's Table 2 tasks as the model reads them: Safari's 10 pairs or 30 random tokens,
# then "=>" (and the query key).
PAPER = {"associative_recall": (10, 22), "induction_head": (20, 31)}


def examples(batch):
    """Yield (inputs, targets, answer_mask) of each example as Python lists."""
    yield from zip(
        batch.inputs.tolist(), batch.targets.tolist(), batch.answer_mask.tolist(), strict=True
    )


def check_common(inputs, targets, mask, vocab_size, seq_len):
    assert len(inputs) == len(targets) == len(mask) == seq_len
    assert all(0 <= tok < vocab_size for tok in inputs + targets)
    assert targets[:-1] == inputs[1:], "targets must be the inputs shifted by one"
    assert mask == [False] * (seq_len - 1) + [True], "only the last position is scored"


def check_recall(batch, vocab_size, seq_len):
    """Associative recall rule, one example at a time."""
    num_keys = (vocab_size - 2) // 2
    keys = set(range(2, 2 + num_keys))
    values = set(range(2 + num_keys, vocab_size))
    for inputs, targets, mask in examples(batch):
        check_common(inputs, targets, mask, vocab_size, seq_len)
        body = inputs
        if seq_len % 2 == 1:
            assert inputs[0] == NOOP
            body = inputs[1:]
        *context, arrow, query = body
        assert arrow == COPY
        assert len(context) % 2 == 0 and len(context) >= 2
        bound = {}
        for i in range(0, len(context), 2):
            key, value = context[i], context[i + 1]
            assert key in keys and value in values
            assert bound.setdefault(key, value) == value, "a key changed its value"
        assert query in bound, "the query key must occur in the context"
        assert targets[-1] == bound[query]


def check_induction(batch, vocab_size, seq_len):
    """Induction head rule, one example at a time."""
    for inputs, targets, mask in examples(batch):
        check_common(inputs, targets, mask, vocab_size, seq_len)
        arrows = [i for i, tok in enumerate(inputs) if tok == COPY]
        assert len(arrows) == 2 and arrows[1] == seq_len - 1
        p = arrows[0]
        assert p + 1 < seq_len - 2, "the copied token is at least two before the final =>"
        assert NOOP not in inputs
        assert targets[-1] == inputs[p + 1]


CHECKERS = {"associative_recall": check_recall, "induction_head": check_induction}


def answers(batch):
    return batch.targets[batch.answer_mask].tolist()


def test_registry_names():
    assert {"associative_recall", "induction_head"} <= set(tasks.names())
    assert tasks.names() == sorted(tasks.names())


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_settings_obey_rule(name):
    vocab_size, seq_len = PAPER[name]
    task = tasks.build(name)
    assert (task.vocab_size, task.seq_len) == (vocab_size, seq_len)
    assert task.params == {"vocab_size": vocab_size, "seq_len": seq_len}
    batch = task.generate(num_examples=2000, seed=0)
    CHECKERS[name](batch, vocab_size, seq_len)


def test_recall_paper_layout():
    inputs = tasks.build("associative_recall").generate(10, seed=3).inputs
    assert (inputs[:, 20] == COPY).all()  # 10 pairs, "=>", query = 22 inputs
    assert (inputs[:, :20] >= 2).all()


def test_recall_query_is_uniform_over_the_keys_present():
    """Safari's law: the query is uniform over the distinct keys of the context, however often
    each occurs. Checked per context: among examples whose keys occur with counts (9, 1) --
    one key nine times, another once -- the rare key is the query half the time (a query
    drawn pair by pair would pick it 1 time in 10)."""
    task = tasks.build("associative_recall", vocab_size=6, seq_len=22)  # 2 keys, 2 values
    batch = task.generate(40000, seed=0)
    keys, query = batch.inputs[:, 0:20:2], batch.inputs[:, -1:]
    count = (keys == query).sum(1)
    other = 10 - count
    lopsided = ((count == 9) & (other == 1)) | ((count == 1) & (other == 9))
    rare = (count[lopsided] == 1).float()
    n = len(rare)
    assert n > 300
    assert abs(rare.mean().item() - 0.5) < 5 * (0.25 / n) ** 0.5
    # And the query always occurred: every example has a count >= 1.
    assert (count >= 1).all()


@pytest.mark.parametrize("name", sorted(PAPER))
def test_shapes_dtypes(name):
    task = tasks.build(name)
    batch = task.generate(num_examples=7, seed=1)
    assert len(batch) == 7
    for tensor, dtype in [
        (batch.inputs, torch.int64),
        (batch.targets, torch.int64),
        (batch.answer_mask, torch.bool),
    ]:
        assert tensor.shape == (7, task.seq_len) and tensor.dtype == dtype
    assert len(task.generate(0, seed=1)) == 0


@pytest.mark.parametrize("name", sorted(PAPER))
def test_determinism(name):
    task = tasks.build(name)
    a, b = task.generate(500, seed=11), task.generate(500, seed=11)
    rebuilt = tasks.build(name, **task.params).generate(500, seed=11)
    for x in (b, rebuilt):
        assert torch.equal(a.inputs, x.inputs) and torch.equal(a.targets, x.targets)
        assert torch.equal(a.answer_mask, x.answer_mask)
    assert not torch.equal(a.inputs, task.generate(500, seed=12).inputs)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_global_rng_untouched(name):
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    tasks.build(name).generate(100, seed=0)
    assert torch.equal(torch.get_rng_state(), state)


def test_random_accuracy_defaults():
    assert tasks.build("associative_recall").random_accuracy == pytest.approx(0.25)
    # Honest chance: 18 ordinary tokens can be the answer (the paper's table says 1/20).
    assert tasks.build("induction_head").random_accuracy == pytest.approx(1 / 18)
    # An odd number of ordinary tokens gives the values the extra one: 7 -> 3 keys, 4 values.
    assert tasks.build("associative_recall", vocab_size=9).random_accuracy == pytest.approx(0.25)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_answers_near_uniform(name):
    """Answers spread evenly over the 1 / random_accuracy possible tokens (5-sigma band)."""
    task = tasks.build(name)
    counts = Counter(answers(task.generate(5000, seed=5)))
    chance = task.random_accuracy
    assert len(counts) == round(1 / chance)
    sigma = (5000 * chance * (1 - chance)) ** 0.5
    for count in counts.values():
        assert abs(count - 5000 * chance) < 5 * sigma


def test_induction_first_arrow_covers_all_positions():
    task = tasks.build("induction_head")
    inputs = task.generate(5000, seed=2).inputs.tolist()
    positions = {row.index(COPY) for row in inputs}
    assert positions == set(range(task.seq_len - 3))  # 0 .. T-4, Safari's range


def test_recall_queries_every_key():
    batch = tasks.build("associative_recall").generate(2000, seed=4)
    assert set(batch.inputs[:, -1].tolist()) == {2, 3, 4, 5}


def test_batch_indexing():
    batch = tasks.build("induction_head").generate(10, seed=0)
    sub = batch[torch.tensor([3, 1])]
    assert isinstance(sub, tasks.Batch) and len(sub) == 2
    assert torch.equal(sub.inputs[0], batch.inputs[3])
    assert torch.equal(batch[2:5].targets, batch.targets[2:5])
    one = batch[-1]
    assert one.inputs.shape == (1, 31) and torch.equal(one.inputs[0], batch.inputs[9])
    for index in (np.int64(-1), torch.tensor(-1)):  # integers of other kinds index alike
        assert torch.equal(batch[index].inputs, one.inputs)
    moved = batch.to("cpu")
    assert torch.equal(moved.inputs, batch.inputs) and moved.answer_mask.dtype == torch.bool
    both = tasks.Batch.cat([batch[:4], batch[4:]])
    assert torch.equal(both.targets, batch.targets)


@settings(max_examples=40, deadline=None)
@given(
    vocab_size=st.integers(6, 40),
    seq_len=st.integers(4, 70),
    seed=st.integers(0, 2**32),
)
def test_recall_property(vocab_size, seq_len, seed):
    task = tasks.build("associative_recall", vocab_size=vocab_size, seq_len=seq_len)
    check_recall(task.generate(64, seed=seed), vocab_size, seq_len)
    assert task.random_accuracy == pytest.approx(1 / (vocab_size - 2 - (vocab_size - 2) // 2))


@settings(max_examples=40, deadline=None)
@given(
    vocab_size=st.integers(4, 40),
    seq_len=st.integers(4, 70),
    seed=st.integers(0, 2**32),
)
def test_induction_property(vocab_size, seq_len, seed):
    task = tasks.build("induction_head", vocab_size=vocab_size, seq_len=seq_len)
    check_induction(task.generate(64, seed=seed), vocab_size, seq_len)
    assert task.random_accuracy == pytest.approx(1 / (vocab_size - 2))


def rows(batch):
    """What a model sees and is scored on, one tuple per example: an unscored target (MQAR's
    random final filler) is blanked, so examples that differ only there count as equal."""
    scored = torch.where(batch.answer_mask, batch.targets, -1)
    return set(map(tuple, torch.cat([batch.inputs, scored], dim=1).tolist()))


@pytest.mark.parametrize(
    "name, params",
    [
        ("associative_recall", {}),
        ("induction_head", {}),
        # 1012 distinct examples: held-out draws often hit train and must be topped up.
        ("associative_recall", {"vocab_size": 6, "seq_len": 16}),
    ],
)
def test_splits_disjoint(name, params):
    task = tasks.build(name, **params)
    splits = tasks.make_splits(task, num_train=1000, num_valid=200, num_test=200, seed=0)
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (1000, 200, 200)
    train, valid, test = rows(splits.train), rows(splits.valid), rows(splits.test)
    assert not valid & train and not test & train and not valid & test
    CHECKERS[name](splits.test, task.vocab_size, task.seq_len)
    again = tasks.make_splits(task, num_train=1000, num_valid=200, num_test=200, seed=0)
    assert torch.equal(again.test.inputs, splits.test.inputs)
    other = tasks.make_splits(task, num_train=1000, num_valid=200, num_test=200, seed=1)
    assert not torch.equal(other.train.inputs, splits.train.inputs)


def test_splits_train_is_not_a_held_out_stream():
    """Split seeds are hashed, so the train data of one seed is never valid data of another."""
    task = tasks.build("associative_recall")
    train_rows = rows(tasks.make_splits(task, 500, 0, 0, seed=1).train)
    for seed in range(3):
        assert not rows(tasks.make_splits(task, 0, 500, 0, seed=seed).valid) & train_rows


def test_splits_too_small_space():
    # vocab 4, seq_len 4 has exactly four distinct examples: "=> a b =>" with a, b in {2, 3}.
    task = tasks.build("induction_head", vocab_size=4, seq_len=4)
    with pytest.raises(ValueError, match="too small"):
        tasks.make_splits(task, num_train=50, num_valid=5, num_test=5)
    # A hopeless request gives up once an optimistic fresh rate cannot fill it, instead of
    # drawing all five rounds (682 x 2000 examples here).
    with pytest.raises(ValueError, match="in 4000 draws") as error:
        tasks.make_splits(task, num_train=50, num_valid=2000, num_test=0)
    assert "found only 0 of num_valid=2000" in str(error.value)


def test_batch_misuse_is_refused():
    batch = tasks.build("induction_head", seq_len=8).generate(3, seed=0)
    for index in (True, torch.tensor(False)):
        with pytest.raises(TypeError, match="single bool is not an index"):
            batch[index]
    assert len(batch[torch.tensor([True, False, True])]) == 2
    longer = tasks.build("induction_head", seq_len=9).generate(2, seed=0)
    with pytest.raises(ValueError, match=r"one seq_len, got \[8, 9\]"):
        tasks.Batch.cat([batch, longer])
    with pytest.raises(ValueError, match="candidates have seq_len 8, excluded 9"):
        tasks.not_in(batch, longer)


def test_inputs_and_targets_are_separate_memory_at_any_batch_size():
    """Editing a batch's inputs in place leaves its targets alone, one example included (where
    contiguous() of the shifted slices would have returned views of one buffer)."""
    for n in (1, 2):
        batch = tasks.build("associative_recall").generate(n, seed=0)
        targets = batch.targets.clone()
        batch.inputs.fill_(-1)
        assert torch.equal(batch.targets, targets)


@pytest.mark.parametrize(
    "name, params, match",
    [
        ("associative_recall", {"vocab_size": 5}, "vocab_size must be >= 6"),
        ("associative_recall", {"seq_len": 3}, "seq_len must be >= 4"),
        ("associative_recall", {"seq_len": 20.5}, "seq_len must be an integer"),
        ("associative_recall", {"vocab": 10}, "unknown parameter 'vocab'"),
        ("induction_head", {"vocab_size": 3}, "vocab_size must be >= 4"),
        ("induction_head", {"seq_len": 3}, "seq_len must be >= 4"),
        ("induction_head", {"seq_len": True}, "seq_len must be an integer"),
        ("induction_head", {"num_pairs": 4}, "unknown parameter 'num_pairs'"),
        ("mqar", {"power_a": 1e40}, r"power_a must be in \(0, 1e\+06\]"),
        ("mqar", {"power_a": 10**400}, r"power_a must be in \(0, 1e\+06\], got an integer beyond"),
        ("mqar", {"name": "mqar"}, "unknown parameter 'name'"),  # not build()'s own argument
        ("memorization", {"map_seed": 2**64}, "map_seed must be <= 18446744073709551615"),
        ("memorization", {"map_seed": -1}, "map_seed must be >= 0"),
        ("no_such_task", {}, "unknown task 'no_such_task'"),
    ],
)
def test_build_errors(name, params, match):
    with pytest.raises(ValueError, match=match):
        tasks.build(name, **params)


def test_generate_and_split_errors():
    task = tasks.build("associative_recall")
    with pytest.raises(ValueError, match="num_examples must be >= 0"):
        task.generate(-1, seed=0)
    with pytest.raises(ValueError, match="seed must be <= 18446744073709551615"):
        task.generate(1, seed=2**64)
    assert torch.equal(task.generate(2, seed=2**64 - 1).inputs, task.generate(2, 2**64 - 1).inputs)
    with pytest.raises(ValueError, match="num_test must be >= 0"):
        tasks.make_splits(task, num_train=10, num_valid=1, num_test=-1)


def test_each_top_up_round_of_a_split_draws_a_new_stream():
    """A held-out split short of fresh examples after its first round tops up from a stream of
    its own: round 1 must not replay round 0 (each of its examples would be kept twice)."""
    from tasks.base import split_seed

    assert len({split_seed(0, "valid", r) for r in range(5)}) == 5
    task = tasks.build("associative_recall", vocab_size=6, seq_len=16)
    splits = tasks.make_splits(task, 1000, 200, 0, seed=0)
    seen = {tuple(x) for x in splits.train.inputs.tolist()}
    first = task.generate(400, split_seed(0, "valid", 0)).inputs.tolist()
    fresh = [x for x in first if tuple(x) not in seen]
    assert 0 < len(fresh) < 200  # the first round falls short
    valid = splits.valid.inputs
    assert valid[: len(fresh)].tolist() == fresh
    k = min(len(fresh), 200 - len(fresh))
    assert not torch.equal(valid[len(fresh) : len(fresh) + k], valid[:k])


def test_a_held_out_split_that_can_be_filled_is_filled_when_fresh_examples_are_rare():
    """AR at vocab 6, seq_len 6 has few distinct examples: after 60 training ones a first round
    may see no fresh example, but one exists, so the split must not give up."""
    task = tasks.build("associative_recall", vocab_size=6, seq_len=6)
    pool = task.generate(20000, seed=99)
    for seed in range(3):
        splits = tasks.make_splits(task, 60, 1, 0, seed=seed)
        assert tasks.not_in(pool, splits.train).any()  # the oracle: a fresh example exists
        seen = {tuple(x) for x in splits.train.inputs.tolist()}
        assert len(splits.valid) == 1 and tuple(splits.valid.inputs[0].tolist()) not in seen
