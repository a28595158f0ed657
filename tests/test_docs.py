"""Docs that cannot drift: the config reference, the metrics glossary, and links that resolve."""

import json
import os
import re
import subprocess
from pathlib import Path

from fgrpo.cli import main
from fgrpo.config_sources import reference_markdown
from tiny import TINY

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_config_reference_is_generated_from_the_code():
    assert (DOCS / "config.md").read_text() == reference_markdown(), (
        "docs/config.md is stale: run `python -m fgrpo.config_sources > docs/config.md`")


def test_every_emitted_metric_is_in_the_glossary(tmp_path):
    out = tmp_path / "run"
    args = ["run", *TINY, "--rounds", "1", "--beta", "0.1", "--proximal-mu", "0.1", "--dp", "client",
            "--format-reward", "0.5", "--dynamic-sampling", "1",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert main(args) == 0
    glossary = (DOCS / "algorithm.md").read_text().split("## 5. Metrics glossary", 1)[1]
    documented = set(re.findall(r"`([a-z_/<>]+)`", glossary))
    emitted = {key for line in (out / "metrics.jsonl").read_text().splitlines() for key in json.loads(line)}
    emitted = {re.sub(r"^(content_accuracy|accuracy|formatted)/.*", r"\1/<task>", key) for key in emitted}
    assert {"kl", "proximal_term", "epsilon", "dp_clipped"} <= emitted  # beta, proximal_mu and dp emit these too
    assert emitted <= documented, f"undocumented metrics: {sorted(emitted - documented)}"
    kept = {key for log in (out / "completions").glob("*.log.jsonl") for line in log.read_text().splitlines()
            for key in json.loads(line)}
    assert {"reward/verifier", "reward/format", "train_accuracy"} <= kept  # the owner's log
    assert kept <= documented, f"undocumented owner-log fields: {sorted(kept - documented)}"


def test_every_relative_link_in_the_docs_resolves_in_a_clean_clone():
    """Links and images of README.md, RESULTS.md, BENCHMARKS.md and docs/ point at files git tracks
    (an ignored or untracked file is missing from every clone)."""
    root = DOCS.parent
    tracked = set(subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True,
                                 check=True).stdout.split())
    pages = ["README.md", "RESULTS.md", "BENCHMARKS.md", *sorted(p for p in tracked if p.startswith("docs/")
                                                                  and p.endswith(".md"))]
    broken, checked = [], 0
    for page in pages:
        for target in re.findall(r"\]\(([^)\s#]+)", (root / page).read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            checked += 1
            path = os.path.normpath(os.path.join(os.path.dirname(page), target))
            if path not in tracked and not any(t.startswith(path + "/") for t in tracked):
                broken.append(f"{page} -> {target}")
    assert checked > 20 and not broken, f"links to files a clone does not have: {broken}"
