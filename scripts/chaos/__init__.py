"""Scenarios of the reliability suite (`scripts/reliability.py`): faults, attacks, fleet and soak.

Each module exposes `SCENARIOS`, a dict of name -> Scenario; the runner imports them in order.
"""
