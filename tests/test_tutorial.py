"""Every command of docs/tutorial.md runs, in order, in a fresh folder, and does what the page says."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tutorial_script() -> str:
    text = (ROOT / "docs" / "tutorial.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 5
    lines = [line for block in blocks for line in block.splitlines() if not line.startswith("export FGRPO_REPO=")]
    return "set -euo pipefail\n" + "\n".join(lines) + "\n"


@pytest.mark.slow
def test_tutorial_commands_run_as_written(tmp_path):
    env = {**os.environ, "FGRPO_REPO": str(ROOT), "FGRPO_CACHE": str(tmp_path / "cache"),
           "FGRPO_DEPLOY_DIR": str(tmp_path / "deploy")}
    done = subprocess.run(["bash", "-c", tutorial_script()], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for run in ("in-process", "flower"):
        summary = json.loads((tmp_path / "runs" / run / "summary.json").read_text())
        assert set(summary["per_task_accuracy"]) == {"tutoring", "wordgames"}
        assert summary["model"].endswith("my-model")
    rows = [json.loads(x) for x in (tmp_path / "runs" / "flower" / "metrics.jsonl").read_text().splitlines()]
    assert {(r["client_id"], r["reward_scale"]) for r in rows if r["kind"] == "client"} == \
        {("tutoring", "math"), ("wordgames", "exact")}
    assert "tutoring" in done.stdout and "wordgames" in done.stdout  # fgrpo eval's table
