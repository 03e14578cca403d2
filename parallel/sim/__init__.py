"""Simulation scaffolding for the tests and benchmarks that run a cluster on one CPU box: spawned gloo
ranks (``launch``), modelled links installed around the dispatcher's transport (``links``), sleeping
compute costs (``cost``) and a toy pipelined language model (``toy_stages``).

Nothing on the training path imports this package (tests/test_link_model.py checks it): production
modules never sleep; a benchmark installs the model it needs through a public seam
(``EPDispatcher.transport``, ``parallel.overlap.trace_all_to_alls``)."""
