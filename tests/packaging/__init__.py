"""Packaging tests: the wheel is built and installed into a fresh virtual environment,
then the installed relay runs (PyPI for the dependencies; marker ``packaging``)."""
