"""Fuzzing the command line (hypothesis): numeric options, and truncated / mutated result and checkpoint files.

Every case must end with exit code 0 or 2 and, on 2, exactly one line on stderr (never a traceback), and
leave its output either complete or untouched. The default suite runs a bounded number of examples; the
``slow`` variants run many more. Valid values of options that set the amount of work (steps, iterations,
routes, buffer sizes) are drawn small so a valid case stays a few seconds; invalid values are drawn from the
whole range (negative, zero, huge, non-finite, not a number).
"""

from __future__ import annotations

import io
import json
import math
import shutil
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from craft.cli import main
from craft.policies import build_policy

torch.set_num_threads(1)
EVAL = ["--split", "val", "--routes", "1", "--types", "HardBreakRoute"]
TINY_FT = ["--split", "val", "--worlds", "2", "--buffer", "24", "--routes", "1", "--types", "HardBreakRoute",
           "--minibatch", "16", "--iters", "1"]


def run_cli(argv: list[str]) -> tuple[int, list[str]]:
    """Exit code and the stderr lines (progress bars left out) of ``craft ARGV`` run in this process; an
    exception other than SystemExit escaping here is a traceback and fails the test."""
    err, out = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    lines = [ln for ln in err.getvalue().replace("\r", "\n").splitlines()
             if ln.strip() and "%|" not in ln and "it/s]" not in ln]
    return code, lines


def assert_clean_exit(code, lines, argv) -> None:
    assert code in (0, 2), (argv, code, lines)
    if code == 2:
        assert len(lines) == 1 and ": error: " in lines[0], (argv, lines)
    assert not any("Traceback" in ln for ln in lines), (argv, lines)


def no_temp_files(folder: Path) -> None:
    left = [p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".craft-write-test")]
    assert left == [], left


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A policy checkpoint, tiny demonstrations, a finished 1-iteration fine-tuning run and an experiment root
    with one table, one run's diagnostics and one evaluation's results."""
    from craft.policies.data import CollectConfig, collect

    root = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    build_policy("hier").save(root / "policy.pt")
    collect(CollectConfig(split="val", routes=1, types=("HardBreakRoute", "PedestrianCrossing"), max_steps=60),
            root / "demos.pt")
    code, lines = run_cli(["finetune", "--method", "craft", "--init", str(root / "policy.pt"), *TINY_FT,
                           "--out", str(root / "run")])
    assert code == 0, lines
    code, lines = run_cli(["eval", "--policy", "lane-follow", *EVAL, "--max-steps", "20", "--out",
                           str(root / "exp" / "runs" / "r1" / "eval-test" / "b2d")])
    assert code == 0, lines
    exp = root / "exp"
    shutil.copyfile(root / "run" / "diagnostics.csv", exp / "runs" / "r1" / "diagnostics.csv")
    (exp / "main-vocab").mkdir()
    (exp / "main-vocab" / "table.json").write_text(json.dumps(
        {"config": {"seeds": [0, 1]}, "table": {}, "runs": ["r1"], "evals": ["r1/eval-test"]}, indent=2))
    (exp / "main-vocab" / "table.md").write_text("# Main table\n\n| a |\n|---|\n| 1 |\n")
    return root


# ---------------------------------------------------------------------------------------------- numbers
GARBAGE = st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity", "1e309", "-1e309", "", " ", "abc", "0x1f",
                           "1_0", "1e-400", "\u22121", "0", "-0", "1.5", "-1", "9" * 30])


def ints(small: int) -> st.SearchStrategy[str]:
    """Invalid integers from the whole range, valid ones up to ``small``."""
    return st.one_of(GARBAGE, st.integers(-2**70, 0).map(str), st.integers(1, small).map(str),
                     st.floats(allow_nan=True, allow_infinity=True).map(repr))


def numbers(hi: float) -> st.SearchStrategy[str]:
    """Any float (non-finite and negative included), valid ones bounded by ``hi``."""
    return st.one_of(GARBAGE, st.floats(allow_nan=True, allow_infinity=True).filter(
        lambda v: not (math.isfinite(v) and v > hi)).map(repr), st.integers(-2**40, 0).map(str))


SEEDS = st.one_of(GARBAGE, st.integers(-2**70, 2**70).map(str), st.integers(0, 50).map(str))
# (command, option, values, the rest of the command line)
SLOTS = [
    ("eval", "--seed", SEEDS, ["--policy", "lane-follow", *EVAL, "--max-steps", "5"]),
    ("eval", "--max-steps", ints(20), ["--policy", "lane-follow", *EVAL]),
    ("eval", "--batch-size", ints(300), ["--policy", "lane-follow", *EVAL, "--max-steps", "5"]),
    ("eval", "--gif", ints(1), ["--policy", "lane-follow", *EVAL, "--max-steps", "5"]),
    ("eval", "--routes", ints(1), ["--policy", "lane-follow", "--split", "val", "--types", "HardBreakRoute",
                                   "--max-steps", "5"]),
    ("finetune", "--lr", numbers(10.0), ["--method", "craft", "INIT", *TINY_FT]),
    ("finetune", "--lr-end", numbers(10.0), ["--method", "grpo", "INIT", *TINY_FT]),
    ("finetune", "--epochs", ints(2), ["--method", "ppo", "INIT", *TINY_FT]),
    ("finetune", "--minibatch", ints(10**6), ["--method", "reinforcepp", "INIT", *TINY_FT]),
    ("finetune", "--seed", SEEDS, ["--method", "craft", "INIT", *TINY_FT]),
    ("pretrain", "--lr", numbers(10.0), ["--family", "hier", "DATA", "--steps", "2", "--batch-size", "4"]),
    ("pretrain", "--batch-size", ints(10**6), ["--family", "hier", "DATA", "--steps", "2"]),
    ("pretrain", "--seed", SEEDS, ["--family", "vocab", "DATA", "--steps", "2", "--batch-size", "4"]),
    ("pretrain", "--steps", ints(3), ["--family", "hier", "DATA", "--batch-size", "4"]),
    ("sim-bench", "--highway-env-seconds", numbers(0.05), ["--configs", "2x4", "--steps", "1", "--threads", "1"]),
    ("sim-bench", "--steps", ints(2), ["--configs", "2x4", "--no-highway-env", "--threads", "1"]),
    ("sim-bench", "--seed", SEEDS, ["--configs", "2x4", "--steps", "1", "--no-highway-env", "--threads", "1"]),
    ("experiment", "--lr", numbers(1e3), ["report"]),
    ("experiment", "--lr-end", numbers(1e3), ["report"]),
    ("experiment", "--seeds", ints(10**6), ["report"]),
    ("experiment", "--iters", ints(10**6), ["report"]),
    ("experiment", "--buffer", ints(10**9), ["report"]),
    ("experiment", "--routes", ints(10**6), ["report"]),
]


@st.composite
def cli_cases(draw):
    cmd, opt, values, rest = draw(st.sampled_from(SLOTS))
    return cmd, opt, draw(values), rest


def check_number_case(assets: Path, case) -> None:
    cmd, opt, value, rest = case
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        out = d / "out"
        rest = [x for r in rest for x in ({"INIT": ["--init", str(assets / "policy.pt")],
                                           "DATA": ["--data", str(assets / "demos.pt")]}.get(r, [r]))]
        if cmd == "sim-bench":
            tail = ["--json", str(out / "bench.json")]
        elif cmd == "experiment":
            shutil.copytree(assets / "exp", out)
            tail = ["--out", str(out), "--doc", str(d / "doc.md")]
        else:
            tail = ["--out", str(out)]
        argv = [cmd, *rest, f"{opt}={value}", *tail]
        before = snapshot(out) if out.exists() else None
        code, lines = run_cli(argv)
        assert_clean_exit(code, lines, argv)
        if code == 2:  # untouched
            assert (snapshot(out) if out.exists() else None) == before, argv
            assert not (d / "doc.md").exists()
        else:  # complete
            done = {"eval": out / "results.json", "finetune": out / "policy.pt", "pretrain": out / "openloop.json",
                    "sim-bench": out / "bench.json", "experiment": d / "doc.md"}[cmd]
            assert done.exists(), argv
        no_temp_files(d)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True)
@given(case=cli_cases())
@example(case=("sim-bench", "--highway-env-seconds", "1e-300", SLOTS[14][3]))  # once a division by zero
def test_fuzz_numeric_options(assets, case):
    check_number_case(assets, case)


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None,
          phases=(Phase.generate,))  # no shrinking: a failing case costs seconds, shrinking repeats it hundreds of times
@given(case=cli_cases())
def test_fuzz_numeric_options_many(assets, case):
    check_number_case(assets, case)


# ---------------------------------------------------------------------------------------------- files
def _containers(kids: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.lists(kids, max_size=3), st.dictionaries(st.text(max_size=6), kids, max_size=3))


JSON_VALUES = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8)),
                           _containers, max_leaves=6)
TARGETS = ["policy", "trainer", "demos", "results", "table", "diagnostics"]


@st.composite
def mutations(draw):
    target = draw(st.sampled_from(TARGETS))
    kinds = ["truncate", "flip"] + (["json"] if target in ("results", "table") else []) \
        + (["config"] if target == "policy" else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "truncate":
        arg = draw(st.floats(0, 1, exclude_max=True))
    elif kind == "flip":
        arg = draw(st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1,
                            max_size=4))
    elif kind == "json":
        arg = (draw(st.integers(0, 50)), draw(JSON_VALUES))
    else:  # a config field of the checkpoint set to another small value
        arg = (draw(st.integers(0, 50)), draw(st.one_of(st.none(), st.booleans(), st.integers(-3, 64),
                                                        st.floats(allow_nan=True, allow_infinity=True),
                                                        st.text(max_size=4), st.lists(st.integers(-1, 4), max_size=3))))
    return target, kind, arg


def _mutate_json(obj, index: int, value):
    """Replace the ``index``-th (cyclically) value found walking ``obj`` with ``value``."""
    slots = []

    def walk(o):
        items = o.items() if isinstance(o, dict) else enumerate(o) if isinstance(o, list) else []
        for k, v in items:
            slots.append((o, k))
            walk(v)

    walk(obj)
    if not slots:
        return value
    o, k = slots[index % len(slots)]
    o[k] = value
    return obj


def apply_mutation(path: Path, kind: str, arg) -> None:
    data = path.read_bytes()
    if kind == "truncate":
        path.write_bytes(data[: int(len(data) * arg)])
    elif kind == "flip":
        b = bytearray(data)
        for pos, x in arg:
            b[int(len(b) * pos)] ^= x
        path.write_bytes(bytes(b))
    elif kind == "json":
        path.write_text(json.dumps(_mutate_json(json.loads(data), *arg)))
    else:
        ck = torch.load(path, weights_only=True)
        keys = sorted(ck["config"])
        ck["config"][keys[arg[0] % len(keys)]] = arg[1]
        torch.save(ck, path)


def check_file_case(assets: Path, mutation) -> None:
    target, kind, arg = mutation
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        out = d / "out"
        init = str(assets / "policy.pt")
        if target == "policy":
            f = d / "policy.pt"
            shutil.copyfile(assets / "policy.pt", f)
            argv = ["eval", "--policy", str(f), *EVAL, "--max-steps", "5", "--out", str(out)]
            done = out / "results.json"
        elif target == "demos":
            f = d / "demos.pt"
            shutil.copyfile(assets / "demos.pt", f)
            argv = ["pretrain", "--family", "hier", "--data", str(f), "--steps", "2", "--batch-size", "4",
                    "--out", str(out)]
            done = out / "openloop.json"
        elif target == "trainer":
            shutil.copytree(assets / "run", out)
            f = out / "trainer.pt"
            argv = ["finetune", "--method", "craft", "--init", init, *TINY_FT, "--resume", "--out", str(out)]
            done = out / "policy.pt"
        else:
            shutil.copytree(assets / "exp", out)
            f = out / {"results": "runs/r1/eval-test/b2d/results.json", "table": "main-vocab/table.json",
                       "diagnostics": "runs/r1/diagnostics.csv"}[target]
            argv = ["experiment", "report", "--out", str(out), "--doc", str(d / "doc.md")]
            done = d / "doc.md"
        apply_mutation(f, kind, arg)
        before = snapshot(out) if out.exists() else None
        code, lines = run_cli(argv)
        assert_clean_exit(code, lines, argv)
        if code == 2:
            assert (snapshot(out) if out.exists() else None) == before, argv
            assert not (d / "doc.md").exists()
        else:
            assert done.exists(), argv
        no_temp_files(d)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True)
@given(mutation=mutations())
def test_fuzz_damaged_files(assets, mutation):
    check_file_case(assets, mutation)


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None,
          phases=(Phase.generate,))  # no shrinking: a failing case costs seconds, shrinking repeats it hundreds of times
@given(mutation=mutations())
def test_fuzz_damaged_files_many(assets, mutation):
    check_file_case(assets, mutation)


# ---------------------------------------------------------------------------------------------- file-system faults
# A write that fails at a random point (the file-size limit set at a random byte count of the largest file the
# command writes, or the k-th rename refused): exit 2 with one line (or 0 if nothing hit the fault), and the
# output either complete or untouched, with no temporary file and no lock left.
FS_TARGETS = ["eval", "finetune", "pretrain", "collect", "render", "report"]


@st.composite
def fs_faults(draw):
    target = draw(st.sampled_from(FS_TARGETS))
    kind = draw(st.sampled_from(["fsize", "rename"]))
    arg = draw(st.floats(0, 1.1)) if kind == "fsize" else draw(st.integers(1, 30))
    return target, kind, arg


def _fs_case(assets: Path, target: str, d: Path) -> tuple[list[str], Path]:
    """The command line of ``target`` writing into the scratch folder ``d`` and its output (prepared: an
    evaluation runs into an older evaluation's folder, the report into a copy of the experiment root)."""
    out = d / "out"
    if target == "eval":
        shutil.copytree(assets / "exp" / "runs" / "r1" / "eval-test" / "b2d", out)
        return ["eval", "--policy", "lane-follow", *EVAL, "--max-steps", "20", "--seed", "1", "--gif", "1",
                "--out", str(out)], out
    if target == "finetune":
        return ["finetune", "--method", "craft", "--init", str(assets / "policy.pt"), *TINY_FT, "--out", str(out)], out
    if target == "pretrain":
        return ["pretrain", "--family", "hier", "--data", str(assets / "demos.pt"), "--steps", "2", "--batch-size",
                "4", "--out", str(out)], out
    if target == "collect":
        return ["collect", "--split", "val", "--routes", "1", "--types", "HardBreakRoute", "--out",
                str(d / "d.pt")], d / "d.pt"
    if target == "render":
        return ["render", "--town-seed", "3", "--out", str(d / "town.png")], d / "town.png"
    shutil.copytree(assets / "exp", out)
    return ["experiment", "report", "--out", str(out), "--doc", str(d / "doc.md")], d / "doc.md"


def _state(path: Path) -> dict | None:
    if not path.exists():
        return None
    return snapshot(path) if path.is_dir() else {"": path.read_bytes()}


_FS_REFERENCE: dict[str, tuple[set, int]] = {}


def fs_reference(assets: Path, target: str) -> tuple[set, int]:
    """(the names of the complete output, the size of the largest file written) of a fault-free run."""
    if target not in _FS_REFERENCE:
        with tempfile.TemporaryDirectory() as d:
            argv, out = _fs_case(assets, target, Path(d))
            code, lines = run_cli(argv)
            assert code == 0, lines
            files = [p for p in Path(d).rglob("*") if p.is_file()]
            names = set(_state(out))
            _FS_REFERENCE[target] = (names, max(p.stat().st_size for p in files))
    return _FS_REFERENCE[target]


def check_fs_fault(assets: Path, fault) -> None:
    import os
    import resource
    from unittest import mock

    target, kind, arg = fault
    names, largest = fs_reference(assets, target)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        argv, out = _fs_case(assets, target, d)
        before = _state(out)
        calls = {"n": 0}
        real_replace, real_rename = os.replace, os.rename

        def refuse(real):
            def f(src, dst, *a, **k):
                calls["n"] += 1
                if calls["n"] == arg:
                    raise OSError(5, "Input/output error", str(dst))
                return real(src, dst, *a, **k)
            return f

        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        try:
            if kind == "fsize":
                resource.setrlimit(resource.RLIMIT_FSIZE, (int(arg * largest), hard))
                code, lines = run_cli(argv)
            else:
                with mock.patch.object(os, "replace", refuse(real_replace)), \
                        mock.patch.object(os, "rename", refuse(real_rename)):
                    code, lines = run_cli(argv)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        assert_clean_exit(code, lines, (fault, argv))
        after = _state(out)
        if code == 2:
            assert after == before, (fault, "not untouched")
        else:
            assert after is not None and set(after) == names, (fault, "not complete")
            if target == "eval":
                assert json.loads(after["results.json"])["summary"]["num_routes"] == 1
        left = [p for p in d.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".craft.lock")]
        assert left == [], (fault, left)


@settings(max_examples=2, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True)
@given(fault=fs_faults().filter(lambda f: f[0] in ("eval", "render", "report")))  # the fast ones by default
@example(fault=("eval", "fsize", 0.0))  # once the lock file's owner line could not be written and stayed
@example(fault=("eval", "rename", 2))  # a move that fails once the old folder is renamed away
def test_fuzz_file_system_faults(assets, fault):
    check_fs_fault(assets, fault)


@pytest.mark.slow
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None,
          phases=(Phase.explicit, Phase.generate))
@given(fault=fs_faults())
@example(fault=("finetune", "fsize", 0.4))  # the case: trainer.pt past the limit
def test_fuzz_file_system_faults_many(assets, fault):
    check_fs_fault(assets, fault)
