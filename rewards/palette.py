"""The colours of the demo's toy world: the palette the tiny decoders are fitted to paint (policies/tiny.py) and the
colour reward measures (rewards/color.py). A leaf module: it imports nothing, so both sides can depend on it."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "purple": (140, 50, 170),
    "orange": (245, 140, 30),
}
