"""Thin typer front-ends. Each module registers its commands on the app and calls library functions.

Modules here import only typer and the standard library at import time: torch, open_clip and faiss are
imported inside command bodies so that `vlmtools --help` stays fast.
"""
