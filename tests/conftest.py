"""Shared pytest setup: tests import the oracle as ``from oracle import check_attention``."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
