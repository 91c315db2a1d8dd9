"""Benchmarks, and the plain implementations they (and the tests) compare against."""
