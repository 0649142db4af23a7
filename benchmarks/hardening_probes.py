"""The hardening probes (issue "Hardening"): hostile-but-fair inputs to the ``craft`` CLI, one row each.

``python benchmarks/hardening_probes.py [SCRATCH]`` runs every probe in a scratch folder and prints a markdown
table: the command (paths shortened to ``S/`` = the scratch folder), its exit code, the first line it printed
on stderr (or its last stdout line when it succeeded) and what was checked afterwards (did a crafted pickle
run, are the written weights finite, was ``--out`` touched, ...). docs/hardening.md holds the table measured
before and after the hardening. Tiny budgets keep every probe to a few seconds (CPU).
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


def run(args: list[str], scratch: Path) -> tuple[int, str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "craft.cli", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    err = [ln for ln in p.stderr.replace("\r", "\n").splitlines() if ln.strip() and "it/s]" not in ln
           and "step/s]" not in ln and "iter]" not in ln and "%|" not in ln]
    out = [ln for ln in p.stdout.splitlines() if ln.strip()]
    tb = any(ln.startswith("Traceback") for ln in err)
    first = ("TRACEBACK: " + err[-1]) if tb else (err[0] if err else (out[-1] if out else ""))
    return p.returncode, first.replace(str(scratch), "S").replace("|", "/")[:150], p.stderr


def weights_finite(path: Path) -> str:
    import torch

    if not path.exists():
        return "no policy.pt"
    ck = torch.load(path, map_location="cpu", weights_only=True)
    ok = all(bool(torch.isfinite(v).all()) for v in ck["state_dict"].values() if v.is_floating_point())
    return "weights finite" if ok else "policy.pt has NON-FINITE weights"


def main() -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    scratch = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="craft-probes-"))
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    S = scratch
    init = str(ROOT / "checkpoints" / "hier.pt")
    rows = []

    def probe(args: list[str], check=lambda: "") -> None:
        code, first, _ = run(args, S)
        shown = " ".join(a.replace(str(S), "S").replace(str(ROOT) + "/", "") for a in args)
        rows.append((shown, code, first, check()))

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

    print("| # | command | exit | first line of the message | checked after |")
    print("|---:|---|---:|---|---|")
    for i, (cmd, code, first, note) in enumerate(rows, 1):
        print(f"| {i} | `craft {cmd}` | {code} | {first} | {note} |")


if __name__ == "__main__":
    main()
