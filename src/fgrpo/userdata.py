"""A data owner's own prompts: JSONL, Parquet or a Hugging Face dataset, split into train and a held-out
test set, with the owner's reward chosen by name (``rewards`` option; the verifiers: ``fgrpo.rewards``).

Sources (``data`` option, one per client): ``*.jsonl`` (one JSON object per line), ``*.parquet``,
a local folder (written by ``save_to_disk``, or any folder ``datasets.load_dataset`` reads), or a
hub dataset name (split ``train``).
Every row needs a non-empty string prompt and a string (or number) answer in the configured
columns; instead of the prompt it may hold a conversation, as TRL accepts: ``messages``, a list of
``{"role": "system" | "user" | "assistant", "content": str}`` ending with a user message (used as
it is with chat prompts; its last user message is the prompt text). A malformed row is an error
that names the file, the line (JSONL) or row (1-based), and the field; with ``skip_bad_rows`` it is
skipped and counted instead.

Rewards (``rewards`` option, one per source or one for all): ``module:func`` (TRL's form or
(prompt, completion, answer)), ``trl:<name>``, ``exact``, ``math`` or ``rg:<dataset>``, several joined by
``+`` with weights, resolved by ``rewards.owner_reward``. A TRL-form function gets each row's other columns
as keyword arguments (``Example.columns``: kept with the row, on the owner's side). A reward that raises or
returns a non-finite value scores that sample 0 and is counted (``reward_failures``, by
``rewards.GuardedReward``, as for every client); it never stops the client.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fgrpo.config import ConfigError
from fgrpo.rewards import OwnerReward, owner_reward
from fgrpo.seeds import derived_seed
from fgrpo.tasks import TASKS, Example
from fgrpo.trl_rewards import BatchReward

HOLDOUT_FRACTION = 0.2  # at most this share of a source is held out for evaluation


class DataError(ConfigError):
    """A malformed data source or row; the message names the file, the line or row, and the field."""


@dataclass
class LoadedRows:
    # {"prompt", "answer"} per good row, "messages" ((role, content), ...) if it has them, and "columns" (its
    # other columns by name) if it has any
    rows: list[dict]
    skipped: int = 0
    first_errors: list[str] = field(default_factory=list)


def load_rows(source: str, prompt_column: str = "prompt", answer_column: str = "answer",
              skip_bad_rows: bool = False) -> LoadedRows:
    """The (prompt, answer) rows of a source, checked row by row."""
    path = Path(source)
    out = LoadedRows([])

    def check(where: str, row: Any) -> None:
        try:
            out.rows.append(_check_row(row, prompt_column, answer_column))
        except ValueError as err:
            message = f"{where}: {err}"
            if not skip_bad_rows:
                raise DataError(message + " (set skip_bad_rows = true to skip such rows)") from None
            out.skipped += 1
            if len(out.first_errors) < 3:
                out.first_errors.append(message)

    if path.suffix == ".jsonl":
        if not path.is_file():
            raise DataError(f"data: {source!r} does not exist")
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    row = ValueError(f"invalid JSON ({err.msg}, column {err.colno})")
                check(f"{source}:{lineno}", row)
    else:
        for index, row in enumerate(_table_rows(source, path, prompt_column, answer_column), start=1):
            check(f"{source}: row {index}", row)
    if not out.rows:
        raise DataError(f"data: {source!r} has no usable rows" + (f" ({out.skipped} skipped)" if out.skipped else ""))
    return out


def _table_rows(source: str, path: Path, prompt_column: str, answer_column: str) -> list[dict]:
    """Rows of a Parquet file or a Hugging Face dataset (local folder or hub name)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        if not path.is_file():
            raise DataError(f"data: {source!r} does not exist")
        table = pq.read_table(path)
        columns, rows = table.column_names, table.to_pylist()
    else:
        import datasets

        try:
            if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
                dataset = datasets.load_from_disk(str(path))  # a folder written by save_to_disk
                dataset = dataset["train"] if isinstance(dataset, datasets.DatasetDict) else dataset
            else:
                dataset = datasets.load_dataset(source, split="train")
        except Exception as err:  # folder without data, unknown hub name, no network, ...
            raise DataError(f"data: cannot load {source!r} as a JSONL file, a Parquet file or a Hugging Face "
                            f"dataset ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
        columns, rows = dataset.column_names, list(dataset)
    for column in (prompt_column if "messages" not in columns else "messages", answer_column):
        if column not in columns:
            raise DataError(f"data: {source!r} has no column {column!r}; its columns are: {', '.join(columns)} "
                            "(choose with prompt_column / answer_column)")
    return rows


def _check_row(row: Any, prompt_column: str, answer_column: str) -> dict[str, str]:
    if isinstance(row, ValueError):
        raise row
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object with fields {prompt_column!r} and {answer_column!r}, "
                         f"got {type(row).__name__}")
    messages = _check_messages(row["messages"]) if prompt_column not in row and "messages" in row else None
    for column in ((answer_column,) if messages else (prompt_column, answer_column)):
        if column not in row:
            raise ValueError(f"missing field {column!r}")
    prompt, answer = (messages[-1][1] if messages else row[prompt_column]), row[answer_column]
    if not isinstance(prompt, str):
        raise ValueError(f"field {prompt_column!r} has type {type(prompt).__name__}; expected a string")
    if not prompt.strip():
        raise ValueError(f"field {prompt_column!r} is empty")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise ValueError(f"field {answer_column!r} has type {type(answer).__name__}; expected a string or a number")
    if not str(answer).strip():
        raise ValueError(f"field {answer_column!r} is empty")
    taken = (answer_column, "messages" if messages else prompt_column)
    columns = {k: v for k, v in row.items() if k not in taken}
    return {"prompt": prompt, "answer": str(answer), **({"messages": messages} if messages else {}),
            **({"columns": columns} if columns else {})}


def _check_messages(messages: Any) -> tuple[tuple[str, str], ...]:
    """A conversational prompt as ((role, content), ...), checked: roles, string contents, a user message last."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("field 'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"field 'messages'[{i}] needs a role of system, user or assistant")
        if not isinstance(message.get("content"), str) or not message["content"].strip():
            raise ValueError(f"field 'messages'[{i}] needs a non-empty string content")
        out.append((message["role"], message["content"]))
    if out[-1][0] != "user":
        raise ValueError("field 'messages' must end with a user message (the prompt)")
    return tuple(out)


@dataclass
class OwnerData:
    name: str  # the task name this owner's prompts are evaluated under (the file's stem)
    train: list[Example]
    test: list[Example]
    reward: OwnerReward | BatchReward
    skipped: int
    first_errors: list[str]


def load_owner(source: str, reward_name: str, prompt_column: str, answer_column: str, skip_bad_rows: bool,
               eval_size: int) -> OwnerData:
    """One data owner: its rows split into train and a held-out test set (a fixed shuffle, so the
    same rows are held out in every run), and its reward. A held-out row carries the judge evaluation scores it
    with (``Example.verifier``: the reward's first function, ``verifier_of``); a training row carries none, its
    correctness comes with its reward."""
    loaded = load_rows(source, prompt_column, answer_column, skip_bad_rows)
    name = Path(source.rstrip("/")).stem or source
    if name in TASKS:
        raise ConfigError(f"data: {source!r} is named like the built-in task {name!r}; rename the file")
    reward = owner_reward(reward_name)
    examples = []
    for r in loaded.rows:  # the row as TRL's reward functions see it: its prompt (or conversation), its columns
        prompt = [{"role": role, "content": text} for role, text in r["messages"]] if "messages" in r else r["prompt"]
        columns = {"prompt": prompt, answer_column: r["answer"], **r.get("columns", {})}
        examples.append(Example(name, r["prompt"], r["answer"], {"answer": r["answer"]}, messages=r.get("messages"),
                                columns=columns))
    order = list(range(len(examples)))
    random.Random(derived_seed("holdout", name)).shuffle(order)
    held = min(eval_size, int(len(examples) * HOLDOUT_FRACTION))
    if held < 1 or held == len(examples):
        raise DataError(f"data: {source!r} has {len(examples)} usable rows; at least 5 are needed to hold out "
                        "a test split")
    test = [replace(examples[i], verifier=reward.verifier_of(examples[i].columns)) for i in order[:held]]
    train = [examples[i] for i in order[held:]]
    return OwnerData(name, train, test, reward, loaded.skipped, loaded.first_errors)


def load_owners(sources: list[str], rewards: list[str], prompt_column: str, answer_column: str,
                skip_bad_rows: bool, eval_size: int) -> tuple[list[OwnerData], list[str]]:
    """One owner per source (named by the source: ``load_owner``), and notes on the rows skipped. A run's clients
    are made of them in ``scenarios.load_clients``."""
    if len(rewards) not in (1, len(sources)):
        raise ConfigError(f"rewards: {len(rewards)} names for {len(sources)} data sources; give one for all "
                          "or one per source")
    owners = [load_owner(src, rewards[k % len(rewards)], prompt_column, answer_column, skip_bad_rows, eval_size)
              for k, src in enumerate(sources)]
    names = [o.name for o in owners]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"data: two sources are named {name!r}; each owner's file needs its own name")
    notes = [f"{o.name}: skipped {o.skipped} bad row(s), e.g. {o.first_errors[0]}" for o in owners if o.skipped]
    return owners, notes
