"""Shared test configuration.

Its presence puts tests/ on sys.path (pytest's default "prepend" import mode), so every test
directory can import the helpers that live here, e.g. `from ports import free_port`.
"""
