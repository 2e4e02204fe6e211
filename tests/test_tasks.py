import collections
import hashlib
import importlib.util
import itertools
import json
import random
from pathlib import Path

import pytest

from nanopost.plumbing.data_files import load_rl
from nanopost.rewards import _equations, format_reward, parse_number
from nanopost.plumbing.safe_math import safe_eval
from nanopost.tasks import ArithmeticTask, CountdownTask, GSM8KTask, get_task, write_jsonl
from nanopost.tasks.countdown import countdown_reward
from nanopost.tasks.gsm8k import load_gsm8k, parse_solution

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


def completion(reasoning: str, answer: str) -> str:
    return f"<think>\n{reasoning}\n</think>\n<answer>{answer}</answer>"


def worked(reasoning: str, answer: str | None = None) -> bool:
    """Every equation in `reasoning` is true (there is one at least), and the last arrives at `answer`."""
    steps = _equations(reasoning)
    if not steps or not all(step[0] for step in steps):
        return False
    if answer is None:
        return True
    value = parse_number(answer)
    return steps[-1][2] == (safe_eval(answer) if value is None else value)


def records(task, per_level=30, seed=0):
    rng = random.Random(seed)
    return [task.sample(rng, level) for level in task.levels for _ in range(per_level)]


@pytest.fixture(scope="module")
def gsm8k_test():
    return GSM8KTask(split="test")


def load_make_data():
    spec = importlib.util.spec_from_file_location("make_data", ROOT / "scripts" / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------ registry

def test_get_task_builds_each_task_with_its_options():
    assert isinstance(get_task("arithmetic"), ArithmeticTask)
    assert get_task("countdown", split="test").split == "test"
    assert get_task("gsm8k", split="test").path.name == "test.jsonl"


def test_get_task_rejects_unknown_names_and_bad_options():
    with pytest.raises(ValueError, match="unknown task 'algebra'"):
        get_task("algebra")
    with pytest.raises(ValueError, match="split must be one of"):
        get_task("arithmetic", split="valid")
    with pytest.raises(ValueError, match="difficulty 10 is not one of the levels"):
        get_task("arithmetic").sample(random.Random(0), 10)
    with pytest.raises(ValueError, match="difficulty 0 is not one of the levels"):
        get_task("countdown").make_split(10, seed=0, levels=[0])


# -------------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("name", ["arithmetic", "countdown"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_generators_are_deterministic_per_seed(name, split):
    task = get_task(name, split=split)
    assert task.make_split(60, seed=1) == get_task(name, split=split).make_split(60, seed=1)
    assert task.make_split(60, seed=1) != task.make_split(60, seed=2)
    assert records(task, 5, seed=3) == records(task, 5, seed=3)


def test_a_levels_records_do_not_depend_on_the_other_levels_asked_for():
    task = ArithmeticTask()
    everything = task.make_split(90, seed=4)
    assert task.make_split(10, seed=4, levels=[6]) == [r for r in everything if r["difficulty"] == 6]


# ------------------------------------------------------------------------ answers and checks

@pytest.mark.parametrize("name", ["arithmetic", "countdown"])
def test_reference_solution_passes_its_own_check_and_format(name):
    task = get_task(name)
    for record in records(task):
        text = completion(record["reasoning"], record["answer"])
        assert task.check(text, record) == 1.0, record
        assert format_reward(text) == 1.0


def test_gsm8k_reference_solution_passes_and_a_wrong_answer_fails(gsm8k_test):
    for record in records(gsm8k_test, 10):
        assert gsm8k_test.check(completion(record["reasoning"], record["answer"]), record) == 1.0
        wrong = str(safe_eval(record["answer"]) + 1)
        assert gsm8k_test.check(completion(record["reasoning"], wrong), record) == 0.0


def test_arithmetic_wrong_answer_fails():
    task = ArithmeticTask()
    for record in records(task):
        for wrong in (int(record["answer"]) + 1, int(record["answer"]) - 10, -int(record["answer"]) or 1):
            assert task.check(completion(record["reasoning"], str(wrong)), record) == 0.0
        assert task.check(record["reasoning"], record) == 0.0  # no answer given


def test_arithmetic_negative_answers_match_with_either_minus_sign():
    task = ArithmeticTask()
    negative = next(r for r in records(task) if r["answer"].startswith("-"))
    assert task.check(f"<answer>\u2212{negative['answer'][1:]}</answer>", negative) == 1.0
    assert task.check(f"<answer>{negative['answer'][1:]}</answer>", negative) == 0.0


def test_countdown_wrong_expressions_fail():
    task = CountdownTask()
    for record in records(task):
        target, numbers = record["target"], record["numbers"]
        assert task.check(f"<answer>{target}</answer>", record) == 0.0                    # numbers unused
        assert task.check(f"<answer>{record['answer']} + 1</answer>", record) == 0.0      # 1 not given
        assert task.check(f"<answer>{' + '.join(map(str, numbers))} + {numbers[0]}</answer>", record) == 0.0
        if sum(numbers) != target:
            assert task.check(f"<answer>{' + '.join(map(str, numbers))}</answer>", record) == 0.0


# --------------------------------------------------------------------------------- reasoning

def test_arithmetic_reasoning_is_one_true_equation_per_operation():
    for record in records(ArithmeticTask()):
        lines = record["reasoning"].split("\n")
        assert len(lines) == record["ops"]
        for line in lines:
            assert worked(line), line
        assert worked(record["reasoning"], record["answer"])
        assert lines[-1].endswith(f"= {record['answer']}")


def test_arithmetic_columns_are_true_one_digit_facts_that_spell_each_result():
    from nanopost.tasks.arithmetic import columns
    rng = random.Random(0)
    cases = [(37, "+", 48), (85, "-", 91), (-6, "+", 12), (-6, "-", 12), (100, "-", 99), (5, "-", 5), (999, "+", 999)]
    cases += [(rng.randint(-2000, 2000), rng.choice("+-"), rng.randint(0, 999)) for _ in range(2000)]
    for value, op, operand in cases:
        head, work = columns(value, op, operand).split(":")
        top, sign, bottom = head.partition("+") if "+" in head else head.partition("-")
        assert int(top) >= int(bottom) and {int(top), int(bottom)} == {abs(value), operand}
        assert (sign == "+") == ((value >= 0) == (op == "+"))  # magnitudes add exactly when the signs agree
        digits, carry = [], 0
        for column in work.split(","):
            left, x = column.split("=")
            terms = [int(t) for t in left.replace("-", "+-").split("+")]
            assert sum(terms) == int(x), column  # each column is a true fact
            assert 0 <= int(x) <= 19
            assert (len(terms) == 3) == bool(carry)  # a carry or borrow in is written, and only then
            if carry:
                assert terms[-1] == (1 if sign == "+" else -1)
            carry = int(x) >= 10 if sign == "+" else terms[0] >= 10
            digits.append(int(x) % 10 if sign == "+" else int(x))
        if sign == "+" and carry:
            digits.append(1)
        magnitude = int("".join(map(str, reversed(digits))))
        assert magnitude == abs(value + operand if op == "+" else value - operand), (value, op, operand)


def test_arithmetic_columns_work_ends_each_step_with_its_equation():
    task = ArithmeticTask(work="columns")
    for record in records(task, 10):
        lines = record["reasoning"].split("\n")
        assert len(lines) == 2 * record["ops"]
        equations = lines[1::2]
        assert all(":" in line for line in lines[::2])
        assert worked("\n".join(equations), record["answer"])
        assert equations[-1].endswith(f"={record['answer']}")
        plain = ArithmeticTask().sample(random.Random(1), record["difficulty"])
        assert task.sample(random.Random(1), record["difficulty"])["answer"] == plain["answer"]
    with pytest.raises(ValueError, match="work must be one of"):
        ArithmeticTask(work="scratch")


def test_arithmetic_levels_have_their_documented_digits_and_operations():
    for record in records(ArithmeticTask(), 20):
        digits, ops = record["digits"], record["ops"]
        assert record["difficulty"] == 3 * (digits - 1) + ops
        operands = record["prompt"].removeprefix("Compute ").removesuffix(".").split(" ")[::2]
        assert len(operands) == ops + 1
        assert all(len(x) == digits for x in operands), record


def test_countdown_reference_reaches_the_target_step_by_step():
    for record in records(CountdownTask(), 50):
        count = len(record["numbers"])
        assert count == (3 if record["difficulty"] <= 2 else 4)
        assert (max(record["numbers"]) > 9) == (record["difficulty"] in (2, 4)) and max(record["numbers"]) <= 25
        assert 1 <= record["target"] <= 100
        assert safe_eval(record["answer"]) == record["target"]
        assert countdown_reward(f"<answer>{record['answer']}</answer>", record["numbers"], record["target"]) == 1.0
        lines = record["reasoning"].split("\n")
        assert len(lines) == count - 1 and lines[-1].endswith(f"= {record['target']}")
        assert worked(record["reasoning"], record["answer"])


def test_countdown_expression_keeps_only_needed_parentheses():
    task = CountdownTask()
    answers = [r["answer"] for r in records(task, 100)]
    assert any("(" in a for a in answers)
    assert not any(a.startswith("(") and a.endswith(")") and a.count("(") == 1 for a in answers)


# -------------------------------------------------------------------------------------- splits

@pytest.mark.parametrize("name", ["arithmetic", "countdown"])
def test_splits_are_balanced_over_levels_in_every_prefix(name):
    task = get_task(name)
    split = task.make_split(20 * len(task.levels) + 3, seed=0)
    counts = collections.Counter(r["difficulty"] for r in split)
    assert sorted(counts.values()) == [20] * (len(task.levels) - 3) + [21] * 3
    assert [counts[level] for level in task.levels[:3]] == [21] * 3  # the remainder goes to the first levels
    prefix = collections.Counter(r["difficulty"] for r in split[:2 * len(task.levels)])
    assert set(prefix.values()) == {2}
    assert len({r["id"] for r in split}) == len(split)


def test_arithmetic_level_one_held_out_split_is_its_whole_bucket():
    held_out = {
        f"Compute {a} {op} {b}." for a, b in itertools.product(range(10), repeat=2) for op in "+-"
        if int(hashlib.sha256(f"Compute {a} {op} {b}.".encode()).hexdigest()[:8], 16) % 100 < 10
    }
    split = ArithmeticTask(split="test").make_split(100, seed=0, levels=[1])
    assert {r["prompt"] for r in split} == held_out and len(split) == len(held_out) == 18


def test_gsm8k_split_is_balanced_until_a_level_runs_out(gsm8k_test):
    split = gsm8k_test.make_split(70, seed=0)
    counts = collections.Counter(r["difficulty"] for r in split)
    assert gsm8k_test.levels == [2, 3, 4, 5, 6, 7, 8]
    assert set(counts.values()) == {10}
    everything = collections.Counter(r["difficulty"] for r in gsm8k_test.make_split(700, seed=0))
    assert everything[8] == len(gsm8k_test.by_level[8]) < 100 == everything[2]


@pytest.mark.parametrize("name", ["arithmetic", "countdown"])
def test_no_held_out_question_is_in_a_large_training_pool(name):
    train, test = get_task(name), get_task(name, split="test")
    pool = {train.key(r) for r in records(train, 20_000 // len(train.levels))}
    held_out = {test.key(r) for r in load_rl(DATA / name / "test.jsonl")}
    assert len(pool) > 10_000 and len(held_out) > 100
    assert not pool & held_out


# ------------------------------------------------------------------------------------- gsm8k

def test_gsm8k_parsing_of_real_lines():
    first = json.loads((DATA / "gsm8k" / "train.jsonl").read_text(encoding="utf-8").split("\n", 1)[0])
    reasoning, answer = parse_solution(first["answer"])
    assert answer == "72"
    assert reasoning == ("Natalia sold 48/2 = 24 clips in May.\n"
                         "Natalia sold 48+24 = 72 clips altogether in April and May.")
    record = GSM8KTask(split="train").records[1]   # "$<<12/60=0.2>>0.2" keeps its dollar sign
    assert record["id"] == "gsm8k-train-2" and record["answer"] == "10" and record["difficulty"] == 2
    assert "Weng earns 12/60 = $0.2 per minute." in record["reasoning"]
    assert "<<" not in record["reasoning"] and ">>" not in record["reasoning"]


def test_gsm8k_answers_are_plain_numbers(gsm8k_test):
    for record in GSM8KTask(split="train").records + gsm8k_test.records:
        assert "<<" not in record["reasoning"] and "####" not in record["reasoning"]
        assert safe_eval(record["answer"]) is not None, record["answer"]   # "1,080" became "1080"
        assert 1 <= record["difficulty"] <= 8


def test_gsm8k_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "1 + 1 = 2\\n#### 2"}\n{"question": "q", "answer": "2"}\n')
    with pytest.raises(ValueError, match=r'bad.jsonl:2: field "answer": no "####"'):
        load_gsm8k(path)
    path.write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match=r'bad.jsonl:1: missing field "answer"'):
        load_gsm8k(path)


# ---------------------------------------------------------------------------------- data files

def test_committed_splits_equal_what_make_data_writes(tmp_path):
    make_data = load_make_data()
    first = make_data.write_splits(tmp_path / "a")
    second = make_data.write_splits(tmp_path / "b")
    for a, b in zip(first, second):
        committed = DATA / a.relative_to(tmp_path / "a")
        assert a.read_bytes() == b.read_bytes() == committed.read_bytes(), committed
        assert committed.stat().st_size < 200_000


def test_committed_splits_are_valid_rl_data():
    for name, levels in (("arithmetic", range(1, 10)), ("countdown", range(1, 5))):
        data = load_rl(DATA / name / "test.jsonl")
        assert {int(r["difficulty"]) for r in data} == set(levels)
        task = get_task(name)
        assert all(task.check(completion(r["reasoning"], r["answer"]), r) == 1.0 for r in data)


def test_write_jsonl_is_one_object_per_line(tmp_path):
    path = tmp_path / "sub" / "x.jsonl"
    write_jsonl([{"id": "a", "prompt": "Compute 1 + 2.", "answer": "3"}, {"id": "b", "text": "\u2212"}], path)
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and [json.loads(x) for x in lines[:-1]][1]["text"] == "\u2212"
