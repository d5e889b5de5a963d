"""Toy verifiable rewards for learning-sanity tests (a random tiny model can reach them)."""


def digit_fraction(completion: str, sample: dict) -> float:
    """Fraction of the completion's characters that are ASCII digits."""
    return sum(c in "0123456789" for c in completion) / max(1, len(completion))


def sevens(completion: str, sample: dict) -> float:
    return completion.count("7") / max(1, len(completion))
