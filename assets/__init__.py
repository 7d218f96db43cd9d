"""Bundled models (``models/``, diffusers format) and benchmark results (``bench/``).

Installed as the data package ``specdiff.assets``; :func:`specdiff.paths.asset` finds a file
here after any install (editable, wheel) and in a plain checkout.
"""
