"""Reward functions that tests name as module:function."""


def length_match(prompt: str, completion: str, answer: str) -> float:
    return float(len(completion.strip()) == len(answer))


def always_fails(prompt: str, completion: str, answer: str) -> float:
    raise RuntimeError("verifier service unreachable")


def exact(prompt: str, completion: str, answer: str) -> float:
    return float(completion.strip() == answer.strip())


def exact_x001(prompt: str, completion: str, answer: str) -> float:
    """Pays 0.01 for a correct answer instead of 1."""
    return 0.01 * exact(prompt, completion, answer)


def exact_x100(prompt: str, completion: str, answer: str) -> float:
    """Pays 100 for a correct answer, and 3 below the others' zero for a wrong one (scale and shift)."""
    return 100.0 * exact(prompt, completion, answer) - 3.0
