"""Developer tooling shared by the integration tests and the benchmarks (not part of the library)."""
