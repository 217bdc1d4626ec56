"""The development harness: local servers, figures and the ``shapes`` model's data and training.

Not part of the installed package: it runs from a source checkout (``python -m harness...``).
"""
