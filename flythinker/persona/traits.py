"""The three binary persona traits of `persona-empathy` (every version) and its split fractions."""

TRAITS: dict[str, tuple[str, str]] = {
    "strategy": ("validation", "steps"),
    "length": ("short", "detailed"),
    "register": ("formal", "casual"),
}
SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)


def split_users(n_users: int, seed: int) -> dict[str, list[int]]:
    """User indices of each split (SPLIT_FRACTIONS of a seeded shuffle; at least one train and one validation
    user): the same split for every version of the bundled datasets."""
    import random

    order = list(range(n_users))
    random.Random(seed + 1).shuffle(order)
    n_train = max(1, round(SPLIT_FRACTIONS[0] * n_users))
    n_val = max(1, round(SPLIT_FRACTIONS[1] * n_users))
    return {"train": order[:n_train], "validation": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
