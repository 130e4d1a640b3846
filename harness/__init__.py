"""Plumbing shared by the test suite and the benchmarks: real peers on loopback and the
scenarios both run. Neither tests/ nor bench/ imports the other; both import this."""
