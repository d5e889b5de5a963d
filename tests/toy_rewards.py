"""Toy verifiable rewards for learning-sanity tests (a random tiny model can reach them)."""


def digit_fraction(completion: str, sample: dict) -> float:
    """Fraction of the completion's characters that are ASCII digits."""
    return sum(c in "0123456789" for c in completion) / max(1, len(completion))


def sevens(completion: str, sample: dict) -> float:
    return completion.count("7") / max(1, len(completion))


# Misbehaving verifiers for the reward pool's tests: each must cost one completion 0, never the run.


def hang(completion: str, sample: dict) -> float:
    while True:
        pass


def hang_if_asked(completion: str, sample: dict) -> float:
    """Hangs on a completion that says HANG, else 0: a batch where a chosen few never finish."""
    if "HANG" in completion:
        hang(completion, sample)
    return 0.0


def crash(completion: str, sample: dict) -> float:
    import os

    os._exit(3)


def not_a_number(completion: str, sample: dict) -> float:
    return float("nan")


def broken(completion: str, sample: dict) -> float:
    raise RuntimeError("verifier bug")


def length(completion: str, sample: dict) -> float:
    return len(completion) / 10


def level_seen(completion: str, sample: dict) -> float:
    """Domain fields of the row (here a Sokoban `level`) reach reward functions."""
    return float(sample["level"] in completion)


def odd_answer_coin(completion: str, sample: dict) -> float:
    """A fixed coin flip of the completion text for prompts with an odd answer; always 0 for even
    ones: groups of even-answer prompts never have a reward spread (dynamic sampling's test)."""
    import zlib

    return float(int(sample["answer"]) % 2 * (zlib.crc32(completion.encode()) % 2))
