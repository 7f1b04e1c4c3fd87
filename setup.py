"""Build script: everything is declared in pyproject.toml. svk is pure Python + Triton; the
native code in csrc/ is compiled on first use with ninja (svk/_native.py), so installing never
needs a compiler or a CUDA toolkit."""
from setuptools import setup

setup()
