"""quiver's benchmarks, one module each, run from the repository root as
`.venv/bin/python -m benchmarks.<name> ...` (benchmarks/README.md lists them). Shared pieces:
`common` (provenance, atomic writes, typed budgets), `stats` (bootstrap intervals and the
other statistics), `local_server` (a server on 127.0.0.1: free port, health)."""
