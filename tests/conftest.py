"""Shared pytest setup: tests import the oracle as ``from oracle import check_attention``.

TRITON_INTERPRET=1 is set before anything imports triton (transformers does, at import time, when it is
installed): the Triton kernels then run on CPU tensors through triton's interpreter (tests/test_triton.py). It
changes nothing for the other kernels."""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))
