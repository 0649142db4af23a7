"""Hardening: untrusted files, numbers and output paths checked before work, one resume record per iteration,
atomic outputs with ordinary modes, and the import graph (docs/hardening.md)."""

from __future__ import annotations

import ast
import os
import pickle
import stat
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from craft.cli import main
from craft.errors import CraftError
from craft.files import atomic_write, check_out_dir, check_out_file, load_torch, staged_folder, write_text
from craft.finetune.collector import CollectorConfig
from craft.finetune.trainer import FinetuneConfig, Trainer, read_state
from craft.policies import build_policy, load_policy

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
TINY = FinetuneConfig(iters=2, minibatch=16, collector=CollectorConfig(
    split="val", worlds=2, buffer_size=24, routes=1, types=("HardBreakRoute",)))
TINY_FT = ["--split", "val", "--worlds", "2", "--buffer", "24", "--routes", "1", "--types", "HardBreakRoute",
           "--minibatch", "16"]


class _Payload:
    """Unpickling this creates ``marker`` (stands for any code an attacker would run)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and "%|" not in ln]
    assert len(lines) == 1 and lines[0].startswith("craft") and ": error: " in lines[0], err
    assert "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------------------------ untrusted files
@pytest.mark.parametrize("fmt", ["zip", "raw-pickle"])
def test_a_crafted_pickle_never_runs(tmp_path, capsys, init_ckpt, fmt):
    marker = tmp_path / "RAN"
    evil = tmp_path / "evil.pt"
    obj = {"format": "craft-policy", "format_version": 1, "x": _Payload(marker)}
    if fmt == "zip":
        torch.save(obj, evil)
    else:
        evil.write_bytes(pickle.dumps(obj))
    with pytest.raises(CraftError):  # the reference: plain pickle would have run it
        load_torch(evil, "policy")
    assert not marker.exists()
    assert main(["eval", "--policy", str(evil), "--split", "val", "--routes", "1", "--types", "HardBreakRoute",
                 "--out", str(tmp_path / "e")]) == 2
    msg = one_line_error(capsys)
    assert "not a readable CRAFT policy checkpoint" in msg and "may run code" in msg
    # the same file as demonstrations, as a fine-tuning init, and as a resume record
    assert main(["pretrain", "--family", "hier", "--data", str(evil), "--out", str(tmp_path / "p")]) == 2
    one_line_error(capsys)
    assert main(["finetune", "--method", "craft", "--init", str(evil), *TINY_FT, "--out", str(tmp_path / "f")]) == 2
    one_line_error(capsys)
    run = tmp_path / "r"
    run.mkdir()
    evil_bytes = evil.read_bytes()
    (run / "trainer.pt").write_bytes(evil_bytes)
    assert main(["finetune", "--method", "craft", "--init", str(init_ckpt), *TINY_FT, "--resume",
                 "--out", str(run)]) == 2
    assert "fine-tuning state" in one_line_error(capsys)
    assert not marker.exists()
    assert not (tmp_path / "e").exists() and not (tmp_path / "p").exists() and not (tmp_path / "f").exists()


def test_nonfinite_weights_are_refused_on_load_and_never_saved(tmp_path, init_ckpt, capsys):
    ck = torch.load(init_ckpt, weights_only=True)
    name = next(k for k, v in ck["state_dict"].items() if v.is_floating_point())
    ck["state_dict"][name] = ck["state_dict"][name].clone()
    ck["state_dict"][name].view(-1)[0] = float("nan")
    torch.save(ck, tmp_path / "nan.pt")
    with pytest.raises(CraftError, match=f"weight '{name}' holds non-finite"):
        load_policy(tmp_path / "nan.pt")
    assert main(["eval", "--policy", str(tmp_path / "nan.pt"), "--split", "val", "--routes", "1",
                 "--types", "HardBreakRoute", "--out", str(tmp_path / "e")]) == 2
    one_line_error(capsys)
    p = build_policy("hier")
    with torch.no_grad():
        dict(p.named_parameters())[name].view(-1)[0] = float("inf")
    with pytest.raises(CraftError, match="refusing to save"):
        p.save(tmp_path / "out" / "policy.pt")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ numbers
@pytest.mark.parametrize("args, needle", [
    (["finetune", "--lr", "inf"], "--lr: expected a learning rate in (0, 1]"),
    (["finetune", "--lr", "nan"], "--lr: expected a learning rate"),
    (["finetune", "--lr", "-1"], "--lr: expected a learning rate"),
    (["finetune", "--lr", "3"], "--lr: expected a learning rate"),
    (["finetune", "--lr-end", "nan"], "--lr-end: expected a learning rate in [0, 1]"),
    (["finetune", "--iters", "99999999999999999999"], "--iters: expected a positive integer"),
    (["finetune", "--seed", "-1"], "--seed: expected a seed"),
    (["finetune", "--town-seeds", "3", "-5"], "--town-seeds: expected a seed"),
    (["eval", "--seed", "-1"], "--seed: expected a seed"),
    (["eval", "--town-seeds", "-1"], "--town-seeds: expected a seed"),
    (["eval", "--gif", "-1"], "--gif: expected an integer in 0.."),
    (["collect", "--perturb", "nan"], "--perturb: expected a probability"),
    (["pretrain", "--lr", "inf"], "--lr: expected a learning rate"),
    (["sim-bench", "--highway-env-seconds", "-1"], "--highway-env-seconds: expected a finite number > 0"),
    (["experiment", "main", "--lr-end=-inf"], "--lr-end: expected a learning rate"),
    (["render", "--town-seed", "99999999999"], "--town-seed: expected a seed"),
])
def test_bad_numbers_are_one_line_before_any_work(tmp_path, capsys, init_ckpt, args, needle):
    base = {"finetune": ["--method", "craft", "--init", str(init_ckpt)], "eval": ["--policy", "lane-follow"],
            "collect": [], "pretrain": ["--family", "hier", "--data", str(tmp_path / "d.pt")], "sim-bench": [],
            "experiment": [], "render": []}[args[0]]
    out = [] if args[0] == "sim-bench" else ["--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        main(args[:1] + base + args[1:] + out)
    assert e.value.code == 2
    assert needle in one_line_error(capsys)
    assert not (tmp_path / "o").exists()


def test_config_fields_are_checked_by_name():
    from craft.experiments import ExperimentConfig
    from craft.policies.data import CollectConfig
    from craft.policies.pretrain import PretrainConfig

    cases = [(lambda: FinetuneConfig(lr=float("inf")), "FinetuneConfig.lr must be a finite number"),
             (lambda: FinetuneConfig(lr_end=-1e-6), r"FinetuneConfig.lr_end must be in \[0, 1\]"),
             (lambda: FinetuneConfig(clip_eps=1.5), r"FinetuneConfig.clip_eps must be in \(0, 1\)"),
             (lambda: FinetuneConfig(w_gr=float("nan")), "FinetuneConfig.w_gr must be a finite number"),
             (lambda: FinetuneConfig(proxy={"dt": 0.0}), "ProxyConfig.dt must be"),
             (lambda: FinetuneConfig(proxy={"reward": {"collision_base": float("inf")}}),
              "collision_base must be finite"),
             (lambda: FinetuneConfig(collector={"seed": -3}), "CollectorConfig.seed must be in"),
             (lambda: FinetuneConfig(collector={"min_live": 2.0}), "CollectorConfig.min_live must be in"),
             (lambda: PretrainConfig(lr=float("nan")), "PretrainConfig.lr must be a finite number"),
             (lambda: PretrainConfig(warmup=-1), "PretrainConfig.warmup must be >= 0"),
             (lambda: CollectConfig(perturb_std=float("inf")), "CollectConfig.perturb_std must be a finite"),
             (lambda: CollectConfig(town_seeds=(1, -1)), "CollectConfig.town_seeds must be in"),
             (lambda: ExperimentConfig(finetune={"lr": float("inf")}), "finite number"),
             (lambda: ExperimentConfig(seeds=(0, -1)), "ExperimentConfig seeds must be in")]
    for make, msg in cases:
        with pytest.raises(CraftError, match=msg):
            make()


# ------------------------------------------------------------------------------------ output paths
def test_output_paths_are_checked_before_any_work(tmp_path, capsys, init_ckpt):
    afile = tmp_path / "afile"
    afile.write_text("keep")
    ev = ["eval", "--policy", "lane-follow", "--split", "val", "--routes", "1", "--types", "HardBreakRoute"]
    for out, needle in ((afile, "is a file, but a folder is needed"), (afile / "sub", "cannot be created"),
                        (Path("/proc/craft-test/x"), "cannot be written")):
        assert main(ev + ["--out", str(out)]) == 2
        assert needle in one_line_error(capsys)
    assert main(["finetune", "--method", "craft", "--init", str(init_ckpt), *TINY_FT, "--out", str(afile)]) == 2
    assert "is a file" in one_line_error(capsys)
    for cmd in (["render"], ["collect"], ["sim-bench", "--no-highway-env", "--json"]):
        assert main(cmd + ([] if cmd[0] == "sim-bench" else ["--out"]) + [str(tmp_path)]) == 2
        assert "is a folder, but a file name is needed" in one_line_error(capsys)
    assert main(["experiment", "report", "--out", str(tmp_path / "none"), "--doc", str(tmp_path / "d.md")]) == 2
    assert "nothing to report" in one_line_error(capsys)
    assert not (tmp_path / "d.md").exists()
    assert main(["experiment", "report", "--out", str(tmp_path), "--doc", str(tmp_path)]) == 2
    assert "--doc" in one_line_error(capsys)
    assert afile.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    with pytest.raises(CraftError):
        check_out_dir("")
    check_out_dir(tmp_path / "new" / "deeper")  # creatable: fine, and nothing is created
    check_out_file(tmp_path / "new" / "f.json")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("content, needle", [
    ('{"config": {"seeds": [0', "experiment table"),
    ('{"runs": "r1"}', "malformed"),
    (b"\xff\xfe\x00garbage", "experiment table"),
])
def test_report_on_damaged_tables_is_one_line(tmp_path, capsys, content, needle):
    (tmp_path / "main-vocab").mkdir()
    (tmp_path / "main-vocab" / "table.md").write_text("# t\n")
    p = tmp_path / "main-vocab" / "table.json"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert main(["experiment", "report", "--out", str(tmp_path), "--doc", str(tmp_path / "doc.md")]) == 2
    assert needle in one_line_error(capsys)
    assert not (tmp_path / "doc.md").exists()


def test_report_on_damaged_runs_is_one_line(tmp_path, capsys):
    (tmp_path / "stability").mkdir()
    (tmp_path / "stability" / "table.json").write_text('{"runs": ["r1"], "evals": ["r1/eval-test"]}')
    (tmp_path / "stability" / "table.md").write_text("# t\n")
    (tmp_path / "runs" / "r1" / "eval-test" / "b2d").mkdir(parents=True)
    (tmp_path / "runs" / "r1" / "diagnostics.csv").write_text("iteration,t_total\n1,abc\n")
    assert main(["experiment", "report", "--out", str(tmp_path), "--doc", str(tmp_path / "doc.md")]) == 2
    assert "diagnostics file" in one_line_error(capsys)
    (tmp_path / "runs" / "r1" / "diagnostics.csv").write_text("iteration,t_total\n1,3.0\n")
    (tmp_path / "runs" / "r1" / "eval-test" / "b2d" / "results.json").write_text('{"summary": {"wall_ti')
    assert main(["experiment", "report", "--out", str(tmp_path), "--doc", str(tmp_path / "doc.md")]) == 2
    assert "results.json is not readable JSON" in one_line_error(capsys)
    # a results file of another layout: the missing field is named
    (tmp_path / "runs" / "r1" / "eval-test" / "b2d" / "results.json").write_text('{"summary": {"wall_time_s": 60}}')
    assert main(["experiment", "report", "--out", str(tmp_path), "--doc", str(tmp_path / "doc.md")]) == 2
    assert "is missing '_checkpoint'" in one_line_error(capsys)


# ------------------------------------------------------------------------------------ resume records
def test_resume_reads_one_record_and_refuses_mixed_pairs(tmp_path, init_ckpt, capsys):
    out = tmp_path / "run"
    tr = Trainer(init_ckpt, out, TINY, progress=False)
    files = []
    for _ in range(2):
        tr.iterate()
        tr._save()
        files.append({n: (out / n).read_bytes() for n in ("trainer.pt", "policy.pt")})
    final = {k: v.clone() for k, v in tr.policy.state_dict().items()}
    assert read_state(out / "trainer.pt")["policy"]["meta"]["finetune"]["iteration"] == 2
    # a crash between the two writes of iteration 2: record at 2, policy.pt at 1 -> the record wins
    (out / "policy.pt").write_bytes(files[0]["policy.pt"])
    r = Trainer(init_ckpt, out, TINY, resume=True, progress=False)
    assert r.iteration == 2 and all(torch.equal(final[k], v) for k, v in r.policy.state_dict().items())
    assert (out / "policy.pt").read_bytes() != files[0]["policy.pt"]
    assert all(torch.equal(final[k], v) for k, v in load_policy(out / "policy.pt").state_dict().items())
    # policy.pt ahead of the record: refused
    (out / "trainer.pt").write_bytes(files[0]["trainer.pt"])
    (out / "policy.pt").write_bytes(files[1]["policy.pt"])
    assert main(["finetune", "--method", "craft", "--init", str(init_ckpt), *TINY_FT, "--iters", "2", "--resume",
                 "--out", str(out)]) == 2
    assert "ahead of trainer.pt" in one_line_error(capsys)
    # a record of the older format (policy.pt is its policy) with policy.pt of another iteration: refused
    st = read_state(tmp_path / "run" / "trainer.pt")  # iteration 1
    del st["policy"], st["format"], st["format_version"]
    torch.save(st, out / "trainer.pt")
    with pytest.raises(CraftError, match="at iteration 2 but trainer.pt at 1: the pair is inconsistent"):
        Trainer(init_ckpt, out, TINY, resume=True, progress=False)
    # --iters below what the record has done
    (out / "trainer.pt").write_bytes(files[1]["trainer.pt"])
    with pytest.raises(CraftError, match="already done 2 iterations"):
        Trainer(init_ckpt, out, replace(TINY, iters=1), resume=True, progress=False)
    # a truncated record on the command line
    (out / "trainer.pt").write_bytes(files[1]["trainer.pt"][:5000])
    assert main(["finetune", "--method", "craft", "--init", str(init_ckpt), *TINY_FT, "--iters", "2", "--resume",
                 "--out", str(out)]) == 2
    assert "is not a readable fine-tuning state" in one_line_error(capsys)


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    from craft.policies.data import CollectConfig, collect

    path = tmp_path_factory.mktemp("demos") / "val.pt"
    collect(CollectConfig(split="val", routes=1, types=("HardBreakRoute", "PedestrianCrossing"), max_steps=200),
            path)
    return path


def test_pretrain_resume_has_no_duplicate_rows_and_can_extend(demos, tmp_path):
    import craft.policies.pretrain as P
    from craft.policies.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(family="hier", steps=8, batch_size=16, ckpt_every=3, log_every=1, val_fraction=0.5)
    pretrain(demos, tmp_path / "full", cfg, progress=False)
    part = tmp_path / "part"
    orig, calls = P.atomic_save, {"n": 0}

    def crash_at_second_record(obj, path):  # a --steps 5 run dies at its final record (step 5), after
        if str(path).endswith("state.pt"):   # rows 4-5 were logged: the record on disk is step 3's
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
        orig(obj, path)

    P.atomic_save = crash_at_second_record
    try:
        with pytest.raises(KeyboardInterrupt):
            pretrain(demos, part, replace(cfg, steps=5), progress=False)
    finally:
        P.atomic_save = orig
    assert read_pretrain_step(part) == 3 and not list(part.glob(".*.tmp"))
    pretrain(demos, part, cfg, resume=True, progress=False)  # resumed with --steps raised 5 -> 8
    steps = [ln.split(",")[0] for ln in (part / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == [str(i) for i in range(1, 9)]
    # all 8 steps are in the warm-up (100 steps), where the schedule does not depend on --steps: the extended,
    # interrupted run equals the uninterrupted one row for row and weight for weight
    assert (part / "metrics.csv").read_text() == (tmp_path / "full" / "metrics.csv").read_text()
    a, b = load_policy(tmp_path / "full").state_dict(), load_policy(part).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CraftError, match="already done 8 steps"):
        pretrain(demos, part, replace(cfg, steps=7), resume=True, progress=False)


def read_pretrain_step(folder: Path) -> int:
    return load_torch(folder / "state.pt", "state")["step"]


# ------------------------------------------------------------------------------------ writes
def test_atomic_writes_clean_up_and_use_ordinary_modes(tmp_path):
    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "one")
        p = build_policy("hier")
        p.save(tmp_path / "policy.pt")
        assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
        assert stat.S_IMODE((tmp_path / "policy.pt").stat().st_mode) == 0o644
        os.umask(0o077)
        write_text(tmp_path / "b.txt", "two")
        assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o600
    finally:
        os.umask(old)

    def fails(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(CraftError, match="could not write .*a.txt': No space left on device"):
        atomic_write(tmp_path / "a.txt", fails)
    assert (tmp_path / "a.txt").read_text() == "one"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.txt", "b.txt", "policy.pt"]
    # a staged folder: all or nothing, results.json moved in last
    with pytest.raises(RuntimeError):
        with staged_folder(tmp_path / "x" / "eval") as st:
            write_text(st / "summary.md", "s")
            raise RuntimeError("boom")
    assert not (tmp_path / "x").exists()
    with staged_folder(tmp_path / "eval") as st:
        write_text(st / "results.json", "{}")
        write_text(st / "summary.md", "s")
    assert sorted(x.name for x in (tmp_path / "eval").iterdir()) == ["results.json", "summary.md"]
    assert [x.name for x in tmp_path.iterdir() if x.name.startswith(".")] == []


def test_eval_writes_its_folder_whole_and_leaves_no_temp_files(tmp_path):
    assert main(["eval", "--policy", "lane-follow", "--split", "val", "--routes", "1", "--types", "HardBreakRoute",
                 "--max-steps", "30", "--gif", "1", "--out", str(tmp_path / "e")]) == 0
    files = {p.name: p.stat() for p in (tmp_path / "e").iterdir()}
    assert {"results.json", "summary.md", "abilities.png"} <= set(files) and any(n.endswith(".gif") for n in files)
    # the staging folder became the output folder (one rename): no lock, no staging left
    assert [p.name for p in tmp_path.iterdir()] == ["e"] and not any(n.startswith(".") for n in files)


# ------------------------------------------------------------------------------------ import graph
def _import_graph() -> dict[str, set[str]]:
    mods = {}
    for p in (ROOT / "craft").rglob("*.py"):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):  # module-level and function-level imports alike
            if isinstance(node, ast.Import):
                edges[m] |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in mods:
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    edges[m].add(sub if sub in mods else node.module)
    return edges


def test_no_import_cycles():
    edges = _import_graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(v, path):
        state[v] = 1
        for w in sorted(edges[v]):
            if state.get(w) == 1:
                cycles.append(path[path.index(w):] + [w])
            elif w not in state:
                visit(w, path + [w])
        state[v] = 2

    for v in sorted(edges):
        if v not in state:
            visit(v, [v])
    assert cycles == []
    # the three that were broken, and the layers: the world never imports the benchmark, policies or demo
    assert "craft.demo" not in edges["craft.bench.runner"]
    assert not edges["craft.scenarios.base"] & {"craft.scenarios.library", "craft.scenarios"}
    assert not edges["craft.policies.base"] & {"craft.policies.vocab", "craft.policies.hier", "craft.policies.vla"}
    for m, deps in edges.items():
        if m.startswith("craft.world"):
            assert not {d for d in deps if d.split(".")[1] in ("bench", "policies", "finetune", "experiments",
                                                               "scenarios", "demo", "cli")}, m


LAYERS = ["errors", "checks", "files", "data", "raytools", "world", "scenarios", "experts", "bench", "policies", "finetune",
          "experiments", "demo", "cli"]
"""docs/architecture.md's layers, bottom first: a module imports only from its own layer or those below."""


def test_layers_point_one_way():
    rank = {name: i for i, name in enumerate(LAYERS)}
    up = set()
    for m, deps in _import_graph().items():
        if m == "craft":
            continue
        a = m.split(".")[1]
        for d in deps - {"craft"}:
            b = d.split(".")[1]
            if rank[b] > rank[a]:
                up.add((m, d))
    # the one documented exception: `make_driver` turns `--policy PATH` into a policy driver (a lazy import)
    assert up == {("craft.bench.runner", "craft.policies.base"), ("craft.bench.runner", "craft.policies.driver")}
