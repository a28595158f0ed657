"""Docs that cannot drift: the config reference and the metrics glossary."""

import json
import re
from pathlib import Path

from fgrpo.cli import main
from fgrpo.config import reference_markdown
from tiny import TINY

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_config_reference_is_generated_from_the_code():
    assert (DOCS / "config.md").read_text() == reference_markdown(), (
        "docs/config.md is stale: run `python -m fgrpo.config > docs/config.md`")


def test_every_emitted_metric_is_in_the_glossary(tmp_path):
    out = tmp_path / "run"
    args = ["run", *TINY, "--rounds", "1", "--beta", "0.1", "--proximal-mu", "0.1", "--dp", "client",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert main(args) == 0
    glossary = (DOCS / "algorithm.md").read_text().split("## 5. Metrics glossary", 1)[1]
    documented = set(re.findall(r"`([a-z_/<>]+)`", glossary))
    emitted = {key for line in (out / "metrics.jsonl").read_text().splitlines() for key in json.loads(line)}
    emitted = {re.sub(r"^accuracy/.*", "accuracy/<task>", key) for key in emitted}
    assert {"kl", "proximal_term", "epsilon", "dp_clipped"} <= emitted  # beta, proximal_mu and dp emit these too
    assert emitted <= documented, f"undocumented metrics: {sorted(emitted - documented)}"
