"""The CleanRL-style example runs top to bottom with a tiny budget (a smoke run, as CleanRL's tests)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ppo_slate_example_runs_briefly():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [
            sys.executable, str(ROOT / "examples" / "ppo_slate.py"), "--total-timesteps", "1024",
            "--num-envs", "64", "--num-steps", "8", "--update-epochs", "2", "--eval-users", "40",
        ],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("update 1/2 steps 512")
    assert "nan" not in out.stdout
    assert lines[-1].startswith("eval 40 users, reward per user: greedy PPO")
