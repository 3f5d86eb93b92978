"""Packaging; the CUDA library in csrc/ is built here when a CUDA toolkit is present."""

from setuptools import setup

setup()
