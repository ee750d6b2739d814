"""pytest-benchmark suites (installed as vpfast.benchmarks so that `vpfast bench` finds them)."""
