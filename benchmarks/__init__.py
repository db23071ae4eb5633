"""Benchmark scripts (run them as files: ``python benchmarks/<script>.py``); a package only so that tests can import
the harness modules by name."""
