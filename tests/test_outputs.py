"""Outputs that survive faults (docs/hardening.md, second issue): refused writes, one owner per output, resume
checks by content, whole-folder evaluations, stale staging files, validated reports, and the first hour of a new
user (help defaults, progress bars, checkpoints found from any folder, README)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tomllib
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from craft.cli import build_parser, main
from craft.errors import CraftError
from craft.files import LOCK_NAME, OutputLock, clean_stale, own_output, staged_folder, write_text
from craft.finetune.trainer import read_state

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
TINY_FT = ["--method", "craft", "--split", "val", "--worlds", "2", "--buffer", "24", "--routes", "1", "--types",
           "HardBreakRoute", "--minibatch", "16"]
EVAL = ["eval", "--policy", "lane-follow", "--split", "val", "--routes", "1", "--types", "HardBreakRoute",
        "--max-steps", "5"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "%|" not in ln]
    assert len(lines) == 1 and lines[0].startswith("craft") and ": error: " in lines[0], err
    assert "Traceback" not in err
    return lines[0]


def temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(LOCK_NAME)]


@contextmanager
def file_size_limit(nbytes: int):
    """``ulimit -f`` of this process for the block (Python ignores SIGXFSZ: a write past it fails with EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.fixture(scope="module")
def run1(tmp_path_factory, init_ckpt):
    """A finished 1-iteration fine-tuning run of ``init_ckpt``."""
    out = tmp_path_factory.mktemp("run1") / "run"
    assert main(["finetune", *TINY_FT, "--init", str(init_ckpt), "--iters", "1", "--out", str(out)]) == 0
    return out


# ------------------------------------------------------------------------------ 1. refused writes
def test_a_refused_torch_write_is_one_line_and_leaves_out_untouched(tmp_path, capsys, init_ckpt):
    out = tmp_path / "ft"
    with file_size_limit(400 * 1024):  # trainer.pt is about 1 MB
        code = main(["finetune", *TINY_FT, "--init", str(init_ckpt), "--iters", "2", "--out", str(out)])
    assert code == 2
    line = one_line_error(capsys)
    assert "could not write" in line and "file-size limit" in line
    assert not out.exists() and temps(tmp_path) == []


def test_a_refused_collect_write_leaves_no_file(tmp_path, capsys):
    out = tmp_path / "d.pt"
    with file_size_limit(20 * 1024):
        code = main(["collect", "--split", "val", "--routes", "1", "--types", "HardBreakRoute", "--out", str(out)])
    assert code == 2 and "could not write" in one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_a_refused_evaluation_write_leaves_the_old_evaluation(tmp_path, capsys):
    out = tmp_path / "e"
    assert main([*EVAL, "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    with file_size_limit(2 * 1024):
        code = main([*EVAL, "--seed", "3", "--gif", "1", "--out", str(out)])
    assert code == 2 and "could not write" in one_line_error(capsys)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert temps(tmp_path) == []


# ------------------------------------------------------------------------------ 2. one owner per output
COMMANDS = {  # every command that writes an output: (argv, the output, kind)
    "eval": (EVAL, "dir"),
    "finetune": (["finetune", *TINY_FT, "--init", "INIT", "--iters", "1"], "dir"),
    "pretrain": (["pretrain", "--family", "hier", "--data", "DATA", "--steps", "1"], "dir"),
    "dagger": (["dagger", "--family", "hier", "--init", "INIT", "--data", "DATA", "--rounds", "1"], "dir"),
    "collect": (["collect", "--split", "val", "--routes", "1", "--types", "HardBreakRoute"], "file"),
    "render": (["render"], "file"),
    "demo": (["demo", "--world-only"], "dir"),
    "sim-bench": (["sim-bench", "--configs", "2x4", "--steps", "1", "--no-highway-env", "--threads", "1"], "file"),
    "experiment": (["experiment", "report"], "file"),
}


@pytest.mark.parametrize("cmd", sorted(COMMANDS))
def test_every_writer_refuses_an_output_another_run_holds(tmp_path, capsys, init_ckpt, cmd):
    argv, kind = COMMANDS[cmd]
    argv = [{"INIT": str(init_ckpt), "DATA": str(tmp_path / "none.pt")}.get(a, a) for a in argv]
    target = tmp_path / ("out" if kind == "dir" else "out.file")
    flag = {"sim-bench": "--json", "experiment": "--doc"}.get(cmd, "--out")
    if cmd == "experiment":
        (tmp_path / "root").mkdir()
        argv += ["--out", str(tmp_path / "root")]
    with own_output(target, flag, kind):  # another run (its lock: the same lock file, another open)
        assert main([*argv, flag, str(target)]) == 2
    assert "is in use by another craft run (pid" in one_line_error(capsys)
    assert not target.exists() and temps(tmp_path) == []  # and the holder leaves nothing


def test_a_dead_owners_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "e"
    code = ("import sys, time; from craft.files import own_output\n"
            f"with own_output({str(out)!r}):\n    print('held', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert p.stdout.readline().strip() == b"held"
        assert main([*EVAL, "--out", str(out)]) == 2
        assert f"pid {p.pid} on" in one_line_error(capsys)
    finally:
        p.kill()  # SIGKILL: the lock file stays, its flock goes
        p.wait()
    assert (out / LOCK_NAME).exists()
    assert main([*EVAL, "--out", str(out)]) == 0
    assert (out / "results.json").exists() and not (out / LOCK_NAME).exists()


def test_the_lock_is_exclusive_within_a_process_and_released(tmp_path):
    lock = OutputLock(tmp_path / LOCK_NAME, "x")
    with pytest.raises(CraftError, match="in use by another craft run"):
        OutputLock(tmp_path / LOCK_NAME, "x")
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
    OutputLock(tmp_path / LOCK_NAME, "x").release()


# ------------------------------------------------------------------------------ 3. resume checks by content
def test_resume_refuses_another_init_by_content(tmp_path, capsys, run1, init_ckpt):
    out = tmp_path / "run"
    shutil.copytree(run1, out)
    ck = torch.load(init_ckpt, weights_only=True)
    k = next(k for k, v in ck["state_dict"].items() if v.is_floating_point())
    ck["state_dict"][k] = ck["state_dict"][k] + 0.01
    other = tmp_path / "other.pt"
    torch.save(ck, other)
    before = (out / "trainer.pt").read_bytes()
    assert main(["finetune", *TINY_FT, "--init", str(other), "--iters", "2", "--resume", "--out", str(out)]) == 2
    assert "was started from another --init" in one_line_error(capsys)
    assert (out / "trainer.pt").read_bytes() == before
    # the same content under another name is the same init; the recorded path stays the run's own
    same = tmp_path / "same.pt"
    shutil.copyfile(init_ckpt, same)
    assert main(["finetune", *TINY_FT, "--init", str(same), "--iters", "2", "--resume", "--out", str(out)]) == 0
    st = read_state(out / "trainer.pt")
    assert st["iteration"] == 2 and st["init"]["path"] == str(init_ckpt)
    assert st["policy"]["meta"]["finetune"]["init"] == str(init_ckpt)


def test_resume_refuses_another_worker_count_before_ray(tmp_path, capsys, run1, monkeypatch):
    import craft.finetune.distributed as dist

    def no_ray(*a, **k):
        raise AssertionError("Ray was started")
    monkeypatch.setattr(dist, "RayCollector", no_ray)
    out = tmp_path / "run"
    shutil.copytree(run1, out)
    init = read_state(out / "trainer.pt")["init"]["path"]
    assert main(["finetune", *TINY_FT, "--init", init, "--iters", "2", "--resume", "--workers", "2", "--out",
                 str(out)]) == 2
    assert "was collected with --workers 1; resume it with --workers 1 (got 2)" in one_line_error(capsys)


def test_pretrain_resume_refuses_other_demonstrations(tmp_path, capsys):
    from craft.policies.data import CollectConfig, collect

    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    collect(CollectConfig(split="val", routes=1, types=("HardBreakRoute", "PedestrianCrossing"), max_steps=60), a)
    collect(CollectConfig(split="val", routes=1, types=("HardBreakRoute", "PedestrianCrossing"), max_steps=60,
                          seed=1), b)
    out = tmp_path / "p"
    assert main(["pretrain", "--family", "hier", "--data", str(a), "--steps", "2", "--batch-size", "4", "--out",
                 str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv", "openloop.json", "policy.pt", "state.pt", "tb"]
    capsys.readouterr()
    assert main(["pretrain", "--family", "hier", "--data", str(b), "--steps", "3", "--batch-size", "4", "--resume",
                 "--out", str(out)]) == 2
    assert "was trained on other demonstrations" in one_line_error(capsys)


# ------------------------------------------------------------------------------ 4. dangling links
@pytest.mark.parametrize("cmd", ["eval", "finetune", "collect"])
def test_a_dangling_link_as_out_is_refused_before_work(tmp_path, capsys, init_ckpt, cmd):
    link = tmp_path / ("out.pt" if cmd == "collect" else "out")
    os.symlink(tmp_path / "nowhere", link)
    argv = {"eval": EVAL, "finetune": ["finetune", *TINY_FT, "--init", str(init_ckpt), "--iters", "1"],
            "collect": ["collect", "--split", "val", "--routes", "1", "--types", "HardBreakRoute"]}[cmd]
    assert main([*argv, "--out", str(link)]) == 2
    assert "is a symbolic link to" in one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == [link.name]


# ------------------------------------------------------------------------------ 5. evaluations replace their folder
def test_an_evaluation_replaces_its_folder_as_a_whole(tmp_path, capsys):
    out = tmp_path / "e"
    assert main([*EVAL, "--gif", "1", "--out", str(out)]) == 0
    assert list(out.glob("worst*.gif"))
    assert main([*EVAL, "--seed", "1", "--out", str(out)]) == 0
    assert not list(out.glob("*.gif"))  # the old GIF went with the old evaluation
    # a name a file cannot be moved onto: the folder is swapped whole, so it does not matter
    (out / "summary.md").unlink()
    (out / "summary.md").mkdir()
    (out / "summary.md" / "x").write_text("x")
    assert main([*EVAL, "--seed", "2", "--out", str(out)]) == 0
    assert (out / "summary.md").is_file() and json.loads((out / "results.json").read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["e"]
    # a folder holding someone else's files is refused before work, untouched
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main([*EVAL, "--out", str(out)]) == 2
    assert "holds files that are not an evaluation's (notes.txt)" in one_line_error(capsys)
    assert (out / "notes.txt").read_text() == "mine"


def test_a_failed_move_puts_back_what_was_moved(tmp_path, monkeypatch):
    out = tmp_path / "o"
    out.mkdir()
    write_text(out / "a", "old a")
    write_text(out / "b", "old b")
    real = os.replace
    calls = []

    def failing(src, dst):
        if Path(dst).parent == out:
            calls.append(dst)
        if len(calls) == 2 and Path(dst).parent == out:  # the second move into the folder
            raise OSError(5, "Input/output error", str(dst))
        return real(src, dst)
    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(CraftError, match="Input/output error"):
        with staged_folder(out, last=()) as st:
            write_text(st / "a", "new a")
            write_text(st / "b", "new b")
            write_text(st / "c", "new c")
    monkeypatch.undo()
    assert {p.name: p.read_text() for p in out.iterdir()} == {"a": "old a", "b": "old b"}
    assert temps(tmp_path) == []


# ------------------------------------------------------------------------------ 6. stale staging files
def test_stale_staging_of_dead_processes_is_removed(tmp_path):
    p = subprocess.Popen(["true"])
    p.wait()
    dead, live = p.pid, os.getppid()
    out = tmp_path / "run"
    (out / "val").mkdir(parents=True)
    stale = [out / f".policy.pt.{dead}.0123abcd.tmp", out / "val" / f".x.{dead}.89abcdef.tmp",
             tmp_path / f".run.{dead}.01234567.tmp"]
    for f in stale[:2]:
        f.write_bytes(b"x")
    stale[2].mkdir()
    (stale[2] / "results.json").write_text("{}")
    kept = [out / f".policy.pt.{live}.0123abcd.tmp", tmp_path / f".other.{dead}.01234567.tmp"]
    for f in kept:
        f.write_bytes(b"x")
    assert clean_stale(out) == 3
    assert not any(f.exists() for f in stale) and all(f.exists() for f in kept)


def test_a_run_cleans_its_outputs_stale_staging(tmp_path, run1, init_ckpt):
    p = subprocess.Popen(["true"])
    p.wait()
    out = tmp_path / "run"
    shutil.copytree(run1, out)
    (out / f".policy.pt.{p.pid}.0123abcd.tmp").write_bytes(b"x")
    (tmp_path / f".run.{p.pid}.0123abcd.tmp").mkdir()
    assert main(["finetune", *TINY_FT, "--init", str(init_ckpt), "--iters", "2", "--resume", "--out",
                 str(out)]) == 0
    assert temps(tmp_path) == []


# ------------------------------------------------------------------------------ 7. validated reports
def _report_root(tmp_path: Path, results: dict) -> Path:
    root = tmp_path / "root"
    (root / "stability").mkdir(parents=True)
    (root / "stability" / "table.json").write_text('{"runs": ["r1"], "evals": ["r1/eval-test"]}')
    (root / "stability" / "table.md").write_text("# t\n")
    (root / "runs" / "r1" / "eval-test" / "b2d").mkdir(parents=True)
    (root / "runs" / "r1" / "diagnostics.csv").write_text("iteration,t_total\n1,3.0\n")
    (root / "runs" / "r1" / "eval-test" / "b2d" / "results.json").write_text(json.dumps(results))
    return root


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("res") / "e"
    assert main([*EVAL, "--out", str(out)]) == 0
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("change, message", [
    ({"DS": float("nan")}, "summary.DS must be a finite number in [0, 100]"),
    ({"wall_time_s": float("nan")}, "wall_time_s must be a finite number of seconds >= 0"),
    ({"wall_time_s": float("inf")}, "wall_time_s must be a finite number of seconds >= 0"),
    ({"wall_time_s": -5.0}, "wall_time_s must be a finite number of seconds >= 0"),
    ("empty", "but the file holds 0 route records"),
])
def test_report_refuses_impossible_figures(tmp_path, capsys, results, change, message):
    r = json.loads(json.dumps(results))
    if change == "empty":
        r["records"], r["_checkpoint"]["records"] = [], []
    else:
        r["summary"].update(change)
    root = _report_root(tmp_path, r)
    doc = tmp_path / "doc.md"
    assert main(["experiment", "report", "--out", str(root), "--doc", str(doc)]) == 2
    assert message in one_line_error(capsys) and not doc.exists()


def test_report_refuses_a_negative_iteration_time(tmp_path, capsys, results):
    root = _report_root(tmp_path, results)
    (root / "runs" / "r1" / "diagnostics.csv").write_text("iteration,t_total\n1,-3.0\n")
    assert main(["experiment", "report", "--out", str(root), "--doc", str(tmp_path / "doc.md")]) == 2
    assert "t_total = -3.0, not a finite number of seconds >= 0" in one_line_error(capsys)


# ------------------------------------------------------------------------------ 8. minor
def test_a_repeated_type_runs_once(tmp_path, capsys):
    from craft.scenarios.splits import split_specs

    assert len(split_specs("val", routes=1, types=["HardBreakRoute", "HardBreakRoute"])) == 1
    out = tmp_path / "e"
    assert main([*EVAL[:-4], "--types", "HardBreakRoute", "HardBreakRoute", "--max-steps", "5", "--out",
                 str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["summary"]["num_routes"] == 1


def test_checkpoint_errors_name_the_file_and_the_keys(tmp_path, capsys, init_ckpt):
    from craft.policies.base import load_policy

    ck = torch.load(init_ckpt, weights_only=True)
    ck["config"]["encoder"]["obs"] = {"radius": -1.0}
    torch.save(ck, tmp_path / "badobs.pt")
    with pytest.raises(CraftError, match=r"badobs\.pt'.*ObsConfig\.radius"):
        load_policy(tmp_path / "badobs.pt")
    ck = torch.load(init_ckpt, weights_only=True)
    names = [k for k, v in ck["state_dict"].items() if v.dim() == 2]
    del ck["state_dict"][names[0]]
    ck["state_dict"][names[1]] = ck["state_dict"][names[1]][:, :3].clone()
    ck["state_dict"]["extra.weight"] = torch.zeros(2)
    torch.save(ck, tmp_path / "mismatch.pt")
    with pytest.raises(CraftError) as e:
        load_policy(tmp_path / "mismatch.pt")
    msg = str(e.value)
    assert f"missing {names[0]}" in msg and "unexpected extra.weight" in msg and f"shape {names[1]}" in msg
    assert "mismatch.pt" in msg


# ------------------------------------------------------------------------------ 9-12. the first hour
def _subparsers():
    import argparse

    p = build_parser()
    return next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_eval_defaults_to_b2d_star_and_every_help_shows_its_defaults():
    subs = _subparsers()
    assert subs["eval"].parse_args(["--policy", "expert", "--out", "x"]).protocol == "b2d-star"
    for name, sp in subs.items():
        text = " ".join(sp.format_help().split())
        for a in sp._actions:
            if a.option_strings and a.default not in (None, False) and a.dest != "help":
                shown = " ".join(map(str, a.default)) if isinstance(a.default, list) else str(a.default)
                helptext = " ".join((a.help or "").split())
                assert f"(default: {shown})" in text or "default" in helptext, (name, a.option_strings)
    top = " ".join(build_parser().format_help().split())
    assert "demo the quick start: evaluate the committed pre-trained policy" in top
    assert "fine-tune it with CRAFT" in top


def test_progress_total_counts_every_routes_step_cap():
    from types import SimpleNamespace

    from craft.bench.runner import DEFAULT_MAX_STEPS, EvalConfig, progress_total

    routes = [SimpleNamespace(), SimpleNamespace(time_limit_s=30.0)]
    assert progress_total(routes, EvalConfig(), 0.1) == DEFAULT_MAX_STEPS + 300
    assert progress_total(routes, EvalConfig(max_steps=40), 0.1) == 80


@pytest.mark.slow
def test_progress_bars_count_route_steps_to_the_end():
    import io

    from tqdm import tqdm

    from craft.bench.runner import EvalConfig, make_driver, progress_total, run_batch
    from craft.scenarios.splits import load_split
    from craft.world.world import World

    inst, towns = load_split("val", routes=1, types=["HardBreakRoute", "PedestrianCrossing"])
    world = World(towns)
    cfg = EvalConfig(max_steps=1000)
    with tqdm(total=progress_total(inst, cfg, world.cfg.dt), file=io.StringIO()) as bar:
        logs, _ = run_batch(world, inst, make_driver("lane-follow"), cfg, progress=bar)
        assert bar.total == 2000 and bar.n == bar.total


def test_committed_checkpoints_are_found_from_any_folder(tmp_path, monkeypatch):
    from craft.policies.base import checkpoint_file, committed_checkpoint, read_checkpoint

    monkeypatch.chdir(tmp_path)
    for fam in ("vocab", "hier", "vla"):
        assert committed_checkpoint(fam) == ROOT / "checkpoints" / f"{fam}.pt" and committed_checkpoint(fam).exists()
    assert checkpoint_file("checkpoints/hier.pt") == ROOT / "checkpoints" / "hier.pt"
    assert read_checkpoint("checkpoints/hier.pt")["family"] == "hier"
    (tmp_path / "checkpoints").mkdir()  # a file of the user's own, where named, wins
    shutil.copyfile(ROOT / "checkpoints" / "vocab.pt", tmp_path / "checkpoints" / "hier.pt")
    assert read_checkpoint("checkpoints/hier.pt")["family"] == "vocab"


def test_readme_says_what_a_new_user_needs():
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set up", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    assert [ln.split("#")[0].strip() for ln in setup.strip().splitlines()] == ["make demo", "make test"]
    flat = " ".join(text.split())
    for needed in ("out/demo/finetune/policy.pt", "--policy out/demo/finetune/policy.pt --split test",
                   "Python 3.11 or newer", "package index", "otherwise idle", "traffic seed 0",
                   "mean over three traffic seeds"):
        assert needed in flat, needed
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "MIT"  # an SPDX string: no deprecation box at install
