"""Reward functions that tests name as module:function."""


def length_match(prompt: str, completion: str, answer: str) -> float:
    return float(len(completion.strip()) == len(answer))


def always_fails(prompt: str, completion: str, answer: str) -> float:
    raise RuntimeError("verifier service unreachable")
