import json
import random

import pytest

from datasets_pipeline.answers import check_answer, split_reasoning
from rayjobs.demo.task import (
    Problem,
    TaskSpec,
    assistant_content,
    draw_problems,
    prompt_messages,
    reasoning_trace,
    sample_problem,
    split_problems,
    training_stream,
    write_task_jsonl,
)


def test_trace_walks_digits_from_the_right_with_carry():
    assert reasoning_trace(457, 985) == "7+5+0=12\n5+8+1=14\n4+9+1=14"


def test_trace_pads_the_shorter_operand_with_zeros():
    assert reasoning_trace(5, 998) == "5+8+0=13\n0+9+1=10\n0+9+1=10"


@pytest.mark.parametrize("a,b", [(0, 0), (9, 1), (999, 999), (100, 900), (12, 345)])
def test_trace_determines_the_answer(a, b):
    """The answer must be readable off the trace: final carry, then sum digits in reverse."""
    steps = reasoning_trace(a, b).split("\n")
    sums = [step.split("=")[1] for step in steps]
    carry_out = sums[-1][0] if sums[-1][0] != "0" else ""
    assert carry_out + "".join(s[1] for s in reversed(sums)) == str(a + b)


def test_assistant_content_round_trips_through_the_parser():
    problem = Problem(457, 985)
    reasoning, answer = split_reasoning(assistant_content(problem))
    assert reasoning == reasoning_trace(457, 985)
    assert answer == "1442" and check_answer(answer, problem.answer, "numeric")


def test_operands_respect_digit_range():
    spec = TaskSpec(min_digits=2, max_digits=3)
    rng = random.Random(0)
    problems = [sample_problem(rng, spec) for _ in range(500)]
    lengths = {len(str(n)) for p in problems for n in (p.a, p.b)}
    assert lengths == {2, 3}


def test_spec_rejects_bad_range():
    with pytest.raises(ValueError):
        TaskSpec(min_digits=3, max_digits=2)


def test_messages_have_optional_system_prompt():
    problem = Problem(12, 34)
    assert prompt_messages(problem, TaskSpec()) == [{"role": "user", "content": "What is 12 + 34?"}]
    with_system = prompt_messages(problem, TaskSpec(system_prompt="Add."))
    assert with_system[0] == {"role": "system", "content": "Add."} and with_system[1]["role"] == "user"


def test_split_is_deterministic_and_disjoint_in_either_order():
    spec = TaskSpec(min_digits=1, max_digits=2)
    train, heldout = split_problems(spec, seed=3, n_train=300, n_heldout=100)
    assert (train, heldout) == split_problems(spec, seed=3, n_train=300, n_heldout=100)
    assert not {p.key for p in train} & {p.key for p in heldout}
    assert len({p.key for p in train}) == 300 and len({p.key for p in heldout}) == 100
    assert Problem(3, 5).key == Problem(5, 3).key


def test_heldout_does_not_depend_on_train_size():
    spec = TaskSpec()
    assert split_problems(spec, 0, 10, 50)[1] == split_problems(spec, 0, 500, 50)[1]
    assert split_problems(spec, 0, 10, 50)[1] != split_problems(spec, 1, 10, 50)[1]


def test_training_stream_never_yields_excluded_problems():
    spec = TaskSpec(min_digits=1, max_digits=1)
    heldout = draw_problems(spec, "heldout", 0, 20)
    stream = training_stream(spec, 0, exclude=heldout)
    seen = {next(stream).key for _ in range(500)}
    assert seen and not seen & {p.key for p in heldout}


def test_too_small_a_space_fails_loudly():
    with pytest.raises(ValueError, match="distinct"):
        draw_problems(TaskSpec(min_digits=1, max_digits=1), "heldout", 0, 56)


def test_write_task_jsonl(tmp_path):
    train_path, heldout_path = write_task_jsonl(tmp_path, TaskSpec(), seed=0, n_train=30, n_heldout=10)
    rows = [json.loads(line) for line in train_path.read_text().splitlines()]
    assert len(rows) == 30 and len(heldout_path.read_text().splitlines()) == 10
    row = rows[0]
    assert set(row) == {"id", "messages", "answer"} and row["id"] == "train-000000"
    a, b = (int(x) for x in row["messages"][-1]["content"].removeprefix("What is ").rstrip("?").split(" + "))
    assert row["answer"] == str(a + b)
