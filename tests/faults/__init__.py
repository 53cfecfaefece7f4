"""Fault injection: kills, interrupts, full disks, bad files, foreign pools, NaN losses, and secrets.

A package so its module names cannot clash with tests/*.py; `make test` runs it with the rest.
"""
