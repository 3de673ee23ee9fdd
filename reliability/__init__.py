"""The reliability suite (`python3 -m reliability`): faults, attacks, fleet and soak scenarios.

`suite` is the runner; every other module but `common` (Context, ScenarioResult, helpers) exposes
`SCENARIOS`, a dict of name -> Scenario, which the runner imports in report order.
"""
