from .rsvd import rsvd
