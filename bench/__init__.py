"""Benchmarks: each module prints JSON; bench.run gathers them into build/bench/report.{json,md}."""
