"""sparsek's performance lab: same-process A/B scripts and probes (perf/README.md, "The lab").

Each script runs as `python perf/lab/<name>.py` or `python -m perf.lab.<name>`, parses its
arguments before touching the GPU (`--help` works anywhere), and reaches the library
through its public names only.
"""
