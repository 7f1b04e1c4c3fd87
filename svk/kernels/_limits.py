"""Block-size facts the dispatcher needs too; no Triton import, so svk imports without it."""

# Largest padded rank the r-sized epilogue keeps in registers (t, s, core in one tile).
MAX_EPILOGUE_RANK = 128


def rank_pad(r: int) -> int:
    """tl.dot needs every dimension ≥ 16 and a power of two for the block."""
    return max(16, 1 << (max(r, 1) - 1).bit_length())
