"""The three binary persona traits of `persona-empathy` (every version) and its split fractions."""

TRAITS: dict[str, tuple[str, str]] = {
    "strategy": ("validation", "steps"),
    "length": ("short", "detailed"),
    "register": ("formal", "casual"),
}
SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)
