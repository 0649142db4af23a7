"""The hardening probes (issue "Hardening"): hostile-but-fair inputs to the ``craft`` CLI, one row each.

``python benchmarks/hardening_probes.py [SCRATCH]`` runs every probe in a scratch folder and prints a markdown
table: the command (paths shortened to ``S/`` = the scratch folder), its exit code, the first line it printed
on stderr (or its last stdout line when it succeeded) and what was checked afterwards (did a crafted pickle
run, are the written weights finite, was ``--out`` touched, ...). docs/hardening.md holds the table measured
before and after the hardening. Tiny budgets keep every probe to a few seconds (CPU).

``--group faults`` runs only the probes of the second hardening issue (file-system faults, shared output
folders, resume checks, first-hour friction); ``--root CHECKOUT`` probes another checkout of the project (e.g.
a ``git worktree`` of the code before a change); ``--json FILE`` keeps the rows, and ``--compare BEFORE AFTER``
prints the before / after table of two such files.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_FT = ["--split", "val", "--worlds", "2", "--buffer", "24", "--routes", "1", "--types", "HardBreakRoute",
           "--minibatch", "16"]
TINY_EVAL = ["--split", "val", "--routes", "1", "--types", "HardBreakRoute", "--max-steps", "30"]


class Evil:
    """Unpickling this runs ``os.system`` (the crafted checkpoint of probe 1)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _fsize_limit(nbytes: int | None):
    """A ``preexec_fn`` setting the file-size limit (``ulimit -f``) of the child, or None."""
    if nbytes is None:
        return None
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.RLIM_INFINITY))


def run(args: list[str], scratch: Path, fsize: int | None = None, cwd: Path | None = None,
        timeout: float = 600) -> tuple[int, str, str]:
    """``craft ARGS`` in a child process (``fsize``: its file-size limit in bytes; ``cwd``: default the probed
    checkout); returns (exit code, first line, stderr). A child still running after ``timeout`` s is killed
    (exit code ``"killed"``)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    try:
        p = subprocess.run([sys.executable, "-m", "craft.cli", *args], cwd=cwd or ROOT, env=env,
                           capture_output=True, text=True, timeout=timeout, preexec_fn=_fsize_limit(fsize))
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        lines = [ln for ln in out.splitlines() if ln.strip()]
        return "killed", (f"still running after {timeout:.0f} s: " + (lines[-1] if lines else ""))[:150], ""
    err = [ln for ln in p.stderr.replace("\r", "\n").splitlines() if ln.strip() and "it/s]" not in ln
           and "step/s]" not in ln and "iter]" not in ln and "%|" not in ln]
    out = [ln for ln in p.stdout.splitlines() if ln.strip()]
    tb = any(ln.startswith("Traceback") for ln in err)
    mine = [ln for ln in err if ln.startswith("craft: ")]  # the command's own line, not a library's warning
    first = ("TRACEBACK: " + err[-1]) if tb else (mine[0] if mine else err[0] if err else (out[-1] if out else ""))
    return p.returncode, first.replace(str(scratch), "S").replace("|", "/")[:150], p.stderr


def weights_finite(path: Path) -> str:
    import torch

    if not path.exists():
        return "no policy.pt"
    ck = torch.load(path, map_location="cpu", weights_only=True)
    ok = all(bool(torch.isfinite(v).all()) for v in ck["state_dict"].values() if v.is_floating_point())
    return "weights finite" if ok else "policy.pt has NON-FINITE weights"


def classic_probes(S: Path, probe) -> None:
    """The probes of the first hardening issue (untrusted files, numbers, output paths, resume records)."""
    import torch

    init = str(ROOT / "checkpoints" / "hier.pt")

    # 1. a crafted pickle as --policy
    marker = S / "PWNED"
    with open(S / "evil.pt", "wb") as f:
        pickle.dump({"format": Evil(str(marker))}, f)
    probe(["eval", "--policy", str(S / "evil.pt"), *TINY_EVAL, "--out", str(S / "e1")],
          lambda: "code RAN" if marker.exists() else "code did not run")
    # 2. non-finite / negative learning rates
    for i, opt in enumerate((["--lr", "inf"], ["--lr-end", "nan"], ["--lr", "nan"], ["--lr", "-1"])):
        d = S / f"lr{i}"
        probe(["finetune", "--method", "craft", "--init", init, *TINY_FT, "--iters", "1", *opt, "--out", str(d)],
              lambda d=d: weights_finite(d / "policy.pt") if d.exists() else "--out untouched")
    # 3. a checkpoint with NaN weights
    ck = torch.load(init, map_location="cpu", weights_only=True)
    k = next(k for k, v in ck["state_dict"].items() if v.is_floating_point())
    ck["state_dict"][k] = ck["state_dict"][k] * float("nan")
    torch.save(ck, S / "nan.pt")
    probe(["eval", "--policy", str(S / "nan.pt"), *TINY_EVAL, "--out", str(S / "e3")])
    # 4. --out checked after the work
    (S / "afile").write_text("x")
    probe(["eval", "--policy", "lane-follow", *TINY_EVAL, "--out", str(S / "afile")])
    probe(["eval", "--policy", "lane-follow", *TINY_EVAL, "--out", str(S / "afile" / "sub")])
    probe(["eval", "--policy", "lane-follow", *TINY_EVAL, "--out", "/proc/craft-probe"])
    probe(["finetune", "--method", "craft", "--init", init, *TINY_FT, "--iters", "1", "--out", str(S / "afile")])
    probe(["collect", "--split", "val", "--routes", "1", "--types", "HardBreakRoute", "--out", str(S)])
    probe(["render", "--out", str(S)])
    probe(["sim-bench", "--configs", "4x8", "--steps", "1", "--no-highway-env", "--threads", "1", "--json", str(S)])
    # 5. negative seeds, bad numbers
    probe(["eval", "--policy", "lane-follow", *TINY_EVAL[:-2], "--town-seeds", "-1", "--out", str(S / "e5")])
    probe(["eval", "--policy", "lane-follow", *TINY_EVAL, "--seed", "-1", "--out", str(S / "e6")])
    probe(["eval", "--policy", "lane-follow", *TINY_EVAL, "--gif", "-1", "--out", str(S / "e7")])
    probe(["sim-bench", "--configs", "4x8", "--steps", "1", "--threads", "1", "--highway-env-seconds", "-1"])
    probe(["collect", "--split", "val", "--routes", "1", "--types", "HardBreakRoute", "--perturb", "nan",
           "--out", str(S / "d.pt")])
    probe(["pretrain", "--family", "hier", "--data", str(S / "none.pt"), "--lr", "nan", "--out", str(S / "p")])
    probe(["experiment", "main", "--lr", "inf", "--out", str(S / "x"), "--doc", str(S / "doc.md")])
    # 6. corrupted trainer.pt on --resume
    ft = S / "ft"
    probe(["finetune", "--method", "craft", "--init", init, *TINY_FT, "--iters", "1", "--out", str(ft)],
          lambda: oct((ft / "policy.pt").stat().st_mode & 0o777) + " policy.pt mode" if (ft / "policy.pt").exists()
          else "")
    cor = S / "ftc"
    shutil.copytree(ft, cor)
    data = (cor / "trainer.pt").read_bytes()
    (cor / "trainer.pt").write_bytes(data[: len(data) // 2])
    probe(["finetune", "--method", "craft", "--init", init, *TINY_FT, "--iters", "1", "--resume", "--out",
           str(cor)])
    # 7. raise --iters on resume
    ext = S / "ftx"
    shutil.copytree(ft, ext)
    probe(["finetune", "--method", "craft", "--init", init, *TINY_FT, "--iters", "2", "--resume", "--out",
           str(ext)])
    # 8. policy.pt one iteration behind trainer.pt (a crash between the two writes), and the reverse
    ft2 = S / "ft2"
    run(["finetune", "--method", "craft", "--init", init, *TINY_FT, "--iters", "2", "--out", str(ft2)], S)
    mix = S / "ftm"
    shutil.copytree(ft2, mix)
    shutil.copyfile(ft / "policy.pt", mix / "policy.pt")

    def same_as_ft2() -> str:
        a = torch.load(mix / "policy.pt", weights_only=True)["state_dict"]
        b = torch.load(ft2 / "policy.pt", weights_only=True)["state_dict"]
        return ("final policy.pt = iteration 2's" if all(torch.equal(a[k], b[k]) for k in a)
                else "final policy.pt is iteration 1's (MIXED)")
    probe(["finetune", "--method", "craft", "--init", init, *TINY_FT, "--iters", "2", "--resume", "--out",
           str(mix)], same_as_ft2)
    mixr = S / "ftr"
    shutil.copytree(ft, mixr)
    shutil.copyfile(ft2 / "policy.pt", mixr / "policy.pt")
    probe(["finetune", "--method", "craft", "--init", init, *TINY_FT, "--iters", "1", "--resume", "--out",
           str(mixr)])
    # 9. experiment report on damaged or missing results
    root = S / "xr"
    (root / "main-vocab").mkdir(parents=True)
    (root / "main-vocab" / "table.json").write_text('{"config": {"seeds": [0')
    (root / "main-vocab" / "table.md").write_text("# t\n")
    probe(["experiment", "report", "--out", str(root), "--doc", str(S / "doc1.md")])
    root2 = S / "xr2"
    (root2 / "stability").mkdir(parents=True)
    (root2 / "stability" / "table.json").write_text('{"runs": ["r1"], "evals": ["r1/eval-test"]}')
    (root2 / "stability" / "table.md").write_text("# t\n")
    (root2 / "runs" / "r1" / "eval-test" / "b2d").mkdir(parents=True)
    (root2 / "runs" / "r1" / "diagnostics.csv").write_text("iteration,t_total\n1,abc\n")
    probe(["experiment", "report", "--out", str(root2), "--doc", str(S / "doc2.md")])
    (root2 / "runs" / "r1" / "diagnostics.csv").write_text("iteration,t_total\n1,3.0\n")
    (root2 / "runs" / "r1" / "eval-test" / "b2d" / "results.json").write_text('{"summary": {"wall_ti')
    probe(["experiment", "report", "--out", str(root2), "--doc", str(S / "doc3.md")])
    probe(["experiment", "report", "--out", str(root), "--doc", str(S)])
    probe(["experiment", "report", "--out", str(S / "no-such-root"), "--doc", str(S / "doc4.md")],
          lambda: "doc WRITTEN" if (S / "doc4.md").exists() else "doc not written")



FAULTS_START = 31
"""The number of the first probe of ``--group faults`` (they follow the 30 probes of the first issue)."""


def _dead_pid() -> int:
    """The pid of a process that has just ended (a stand-in for a killed run's)."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _listing(folder: Path) -> str:
    """What is in ``folder`` (hidden names included), short."""
    if not folder.exists() and not folder.is_symlink():
        return "absent"
    if not folder.is_dir():
        return "a file" if folder.exists() else "a dangling link"
    names = sorted(p.name for p in folder.iterdir())
    return (", ".join(names) if names else "empty")[:90]


def _temps(folder: Path) -> int:
    """Staging / temporary files anywhere under ``folder``."""
    return sum(1 for p in folder.rglob("*") if p.name.endswith(".tmp"))


def fault_probes(S: Path, probe, last: dict) -> None:
    """The probes of the second hardening issue: writes that fail, one owner per output folder, resume checks,
    stale staging files, report validation, duplicated types, help texts and the first hour of a new user."""
    import json
    import signal
    import time

    import torch

    init = str(ROOT / "checkpoints" / "hier.pt")
    ft = ["finetune", "--method", "craft", "--init", init, *TINY_FT]
    tiny_eval = ["eval", "--policy", "lane-follow", *TINY_EVAL]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")

    def untouched(d: Path) -> str:
        return f"--out: {_listing(d)}; temporary files left: {_temps(S)}"

    # item 1: a write that fails (file-size limit)
    d = S / "fz"
    probe([*ft, "--iters", "2", "--out", str(d)], lambda: untouched(d), fsize=400 * 1024, prefix="(ulimit -f 400) ")
    probe(["collect", "--split", "val", "--routes", "1", "--types", "HardBreakRoute", "--out", str(S / "dz.pt")],
          lambda: f"dz.pt {'present' if (S / 'dz.pt').exists() else 'absent'}; temporary files left: {_temps(S)}",
          fsize=20 * 1024, prefix="(ulimit -f 20) ")
    d = S / "ez"
    probe([*tiny_eval, "--gif", "1", "--out", str(d)], lambda: untouched(d), fsize=40 * 1024,
          prefix="(ulimit -f 40) ")
    # item 2: two runs share an --out (the second starts once the first is at work)
    D = S / "shared"
    with open(S / "a.err", "w") as err:
        a = subprocess.Popen([sys.executable, "-m", "craft.cli", *ft, "--iters", "4", "--out", str(D)], cwd=ROOT,
                             env=env, stdout=subprocess.DEVNULL, stderr=err)
        t0 = time.time()
        while "finetune" not in (S / "a.err").read_text() and a.poll() is None and time.time() - t0 < 120:
            time.sleep(0.2)
        time.sleep(0.5)

        def shared() -> str:
            code_a = a.wait()
            code_r, _, _ = run([*ft, "--iters", "4", "--resume", "--out", str(D)], S)
            return f"the first run exit {code_a}; then --resume of the first's arguments: exit {code_r}"
        probe([*ft, "--iters", "3", "--seed", "5", "--lr", "0.001", "--out", str(D)], shared,
              prefix="(while another run writes D) ")
    # item 3: --resume with another --init
    base = S / "ft1"
    run([*ft, "--iters", "1", "--out", str(base)], S)
    ck = torch.load(init, map_location="cpu", weights_only=True)
    k = next(k for k, v in ck["state_dict"].items() if v.is_floating_point())
    ck["state_dict"][k] = ck["state_dict"][k] + 0.01
    torch.save(ck, S / "other.pt")
    d = S / "fti"
    shutil.copytree(base, d)
    probe(["finetune", "--method", "craft", "--init", str(S / "other.pt"), *TINY_FT, "--iters", "2", "--resume",
           "--out", str(d)])
    # item 4: a dangling symbolic link as --out
    os.symlink(S / "nowhere", S / "dangle")
    os.symlink(S / "nowhere.pt", S / "dangle.pt")
    for args in ([*tiny_eval, "--out", str(S / "dangle")], [*ft, "--iters", "1", "--out", str(S / "dangle")],
                 ["collect", "--split", "val", "--routes", "1", "--types", "HardBreakRoute", "--out",
                  str(S / "dangle.pt")]):
        probe(args, lambda: f"{last['seconds']:.0f} s")
    # item 5: an evaluation into an old evaluation's folder
    d = S / "ev"
    run([*tiny_eval, "--gif", "1", "--out", str(d)], S)
    probe([*tiny_eval, "--seed", "1", "--out", str(d)],
          lambda: "old GIF left beside the new results" if list(d.glob("*.gif")) else "replaced as a whole")
    d = S / "eh"
    run([*tiny_eval, "--out", str(d)], S)
    old = (d / "results.json").read_bytes()
    (d / "summary.md").unlink()
    (d / "summary.md").mkdir()
    (d / "summary.md" / "x").write_text("x")  # a name that a file cannot replace

    def halfway() -> str:
        new_res = (d / "results.json").read_bytes() != old
        kind = "replaced by the new file" if (d / "summary.md").is_file() else "still the old folder"
        return f"results.json {'new' if new_res else 'OLD'}, summary.md {kind}"
    probe([*tiny_eval, "--seed", "1", "--out", str(d)], halfway)
    # item 6: staging files and a lock left by killed runs
    d = S / "ftk"
    shutil.copytree(base, d)
    dead = _dead_pid()
    (d / f".policy.pt.{dead}.0123abcd.tmp").write_bytes(b"x")
    (S / f".ftk.{dead}.0123abcd.tmp").mkdir()
    (S / f".ftk.{dead}.0123abcd.tmp" / "results.json").write_text("{}")
    (d / ".craft.lock").write_text(f"pid {dead} host {os.uname().nodename}\n")
    probe([*ft, "--iters", "2", "--resume", "--out", str(d)],
          lambda: f"stale temporary files left: {_temps(S / 'ftk') + len(list(S.glob('.ftk.*.tmp')))}")
    d = S / "ftK"
    with open(S / "k.err", "w") as err:
        k_proc = subprocess.Popen([sys.executable, "-m", "craft.cli", *ft, "--iters", "3", "--out", str(d)],
                                  cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
        t0 = time.time()
        while not (d / "trainer.pt").exists() and k_proc.poll() is None and time.time() - t0 < 180:
            time.sleep(0.2)
        k_proc.send_signal(signal.SIGKILL)
        k_proc.wait()
    probe([*ft, "--iters", "3", "--resume", "--out", str(d)], lambda: f"{_temps(d)} temporary files left",
          prefix="(after SIGKILL of the run in D) ")
    # item 7: a report of results with non-finite or negative figures
    res = json.loads((S / "ev" / "results.json").read_text())
    for name, change in (("xn", {"wall_time_s": float("nan"), "DS": float("nan")}), ("xneg", {"wall_time_s": -5.0}),
                         ("xe", "empty")):
        root = S / name
        (root / "stability").mkdir(parents=True)
        (root / "stability" / "table.json").write_text('{"runs": ["r1"], "evals": ["r1/eval-test"]}')
        (root / "stability" / "table.md").write_text("# t\n")
        (root / "runs" / "r1" / "eval-test" / "b2d").mkdir(parents=True)
        (root / "runs" / "r1" / "diagnostics.csv").write_text("iteration,t_total\n1,3.0\n")
        r = json.loads(json.dumps(res))
        if change == "empty":
            r["records"], r["_checkpoint"]["records"] = [], []
        else:
            r["summary"].update(change)
        (root / "runs" / "r1" / "eval-test" / "b2d" / "results.json").write_text(json.dumps(r))
        doc = S / f"{name}.md"

        def written(doc=doc) -> str:
            if not doc.exists():
                return "doc not written"
            t = doc.read_text().lower()
            return "doc WRITTEN" + (" with nan / inf" if "nan" in t or "inf " in t else "")
        probe(["experiment", "report", "--out", str(root), "--doc", str(doc)], written)
    # item 8: duplicated --types, --workers on resume, a bad observation config, mismatched weights
    probe(["eval", "--policy", "lane-follow", "--split", "val", "--routes", "1", "--types", "HardBreakRoute",
           "HardBreakRoute", "--max-steps", "30", "--out", str(S / "et")])
    d = S / "ftw"
    shutil.copytree(base, d)
    probe([*ft, "--iters", "2", "--resume", "--workers", "2", "--out", str(d)], lambda: f"{last['seconds']:.0f} s")
    ck = torch.load(init, map_location="cpu", weights_only=True)
    ck["config"]["encoder"]["obs"] = {"radius": -1.0}
    torch.save(ck, S / "badobs.pt")
    probe([*tiny_eval[:1], "--policy", str(S / "badobs.pt"), *TINY_EVAL, "--out", str(S / "eo")])
    ck = torch.load(init, map_location="cpu", weights_only=True)
    names = [k for k, v in ck["state_dict"].items() if v.is_floating_point() and v.dim() == 2]
    del ck["state_dict"][names[0]]
    ck["state_dict"][names[1]] = ck["state_dict"][names[1]][:, :3].clone()
    torch.save(ck, S / "mismatch.pt")
    probe([*tiny_eval[:1], "--policy", str(S / "mismatch.pt"), *TINY_EVAL, "--out", str(S / "em")])

    # items 9-11: help texts, progress bars, the demo away from the repository
    def help_line(argv: list[str], word: str) -> str:
        p = subprocess.run([sys.executable, "-m", "craft.cli", *argv], cwd=ROOT, env=env, capture_output=True,
                           text=True)
        text = " ".join(p.stdout.split())
        i = text.rfind(word)
        return text[i:i + 110] if i >= 0 else f"({word} not found)"
    probe(["eval", "--help"], lambda: help_line(["eval", "--help"], "--protocol {b2d,b2d-star} "))
    probe(["--help"], lambda: help_line(["--help"], "demo "))

    def bar_end() -> str:
        import re

        ends = re.findall(r"(\d+)/(\d+) \[", last["stderr"].replace("\r", "\n"))
        if not ends:
            return "no progress bar"
        n, tot = map(int, ends[-1])
        return f"bar ended at {n}/{tot} ({100 * n / max(tot, 1):.0f} %)"
    probe([*tiny_eval[:-2], "--out", str(S / "eb")], bar_end)
    elsewhere = S / "elsewhere"
    elsewhere.mkdir()
    probe(["demo", "--iters", "1", "--out", str(elsewhere / "demo")], timeout=25, cwd=elsewhere,
          prefix="(from another folder) ")


def _table(before: list, after: list, start: int) -> str:
    lines = ["| # | command (`S/` = scratch folder) | before: exit, first line | after: exit, first line |",
             "|---:|---|---|---|"]

    def cell(r) -> str:
        return f"{r['code']}: {r['first']}" + (f" — {r['note']}" if r["note"] else "")
    for i, (b, a) in enumerate(zip(before, after), start):
        lines.append(f"| {i} | `{b['command']}` | {cell(b)} | {cell(a)} |")
    return "\n".join(lines)


def main() -> None:
    import argparse
    import json
    import time

    global ROOT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scratch", nargs="?", help="scratch folder (emptied first; default: a new temporary folder)")
    ap.add_argument("--root", help="the checkout to probe (default: this one)")
    ap.add_argument("--group", choices=["all", "classic", "faults"], default="all")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"),
                    help="print the before / after table of two --json files instead")
    args = ap.parse_args()
    if args.compare:
        b, a = (json.loads(Path(f).read_text()) for f in args.compare)
        print(_table(b["rows"], a["rows"], b["start"]))
        return
    if args.root:
        ROOT = Path(args.root).resolve()
    sys.path.insert(0, str(ROOT))
    scratch = Path(args.scratch) if args.scratch else Path(tempfile.mkdtemp(prefix="craft-probes-"))
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    S = scratch
    rows = []
    last: dict = {}

    def probe(argv: list[str], check=lambda: "", fsize: int | None = None, cwd: Path | None = None,
              timeout: float = 600, prefix: str = "") -> None:
        t0 = time.time()
        code, first, err = run(argv, S, fsize=fsize, cwd=cwd, timeout=timeout)
        last.update(seconds=time.time() - t0, stderr=err)
        shown = prefix + " ".join(a.replace(str(S), "S").replace(str(ROOT) + "/", "") for a in argv)
        note = check().replace(str(S), "S").replace("|", "/")
        rows.append({"command": f"{prefix}craft {shown[len(prefix):]}".replace("|", "\\|"), "code": code,
                     "first": first.replace(str(ROOT) + "/", ""), "note": note})
        print(f"[{len(rows)}] {shown[:80]} -> {code} ({last['seconds']:.0f} s)", file=sys.stderr, flush=True)

    start = 1
    if args.group in ("all", "classic"):
        classic_probes(S, probe)
    else:
        start = FAULTS_START
    if args.group in ("all", "faults"):
        fault_probes(S, probe, last)
    print("| # | command | exit | first line of the message | checked after |")
    print("|---:|---|---:|---|---|")
    for i, r in enumerate(rows, start):
        print(f"| {i} | `{r['command']}` | {r['code']} | {r['first']} | {r['note']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"root": str(ROOT), "start": start, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
