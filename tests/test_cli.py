"""The command line: figures land in the JSON, pictures get written, bad input is one line and exit 2."""

from __future__ import annotations

import json

import numpy as np

from PIL import Image

from craft.cli import main


def test_sim_bench_writes_required_figures(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["sim-bench", "--configs", "8x16", "4x24", "--steps", "3", "--highway-env-seconds", "0.5",
               "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    for key in ("agent_steps_per_s", "highway_env_agent_steps_per_s", "ratio_vs_highway_env", "worlds", "agents",
                "device", "configs"):
        assert key in r, key
    assert r["worlds"] == 8 and r["agents"] == 16 and len(r["configs"]) == 2
    assert r["agent_steps_per_s"] > 0 and r["highway_env_agent_steps_per_s"] > 0
    assert all(c["finite"] for c in r["configs"])
    assert "agent-steps/s" in capsys.readouterr().out


def test_render_writes_town_png(tmp_path):
    out = tmp_path / "town.png"
    assert main(["render", "--town-seed", "3", "--out", str(out)]) == 0
    im = Image.open(out)
    assert im.size[0] >= 800 and len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 20
    assert [p.name for p in tmp_path.iterdir()] == ["town.png"]  # nothing half-written left


def test_bad_arguments_are_one_line_and_exit_2(tmp_path, capsys):
    for argv in (["sim-bench", "--configs", "12"], ["sim-bench", "--steps", "-1"], ["render", "--town-seed", "x",
                                                                                     "--out", "a.png"],
                 ["nonsense"], ["sim-bench", "--device", "tpu"]):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
        assert rc == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "error" in err, (argv, err)
    assert not (tmp_path / "a.png").exists()
