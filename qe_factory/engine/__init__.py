"""The physics engine: structures, pseudopotentials, pw.x inputs, running, parsing, classifying, recovering and
sanitizing. It never imports FireWorks or jobflow (tests/unit/test_layers.py guards this); the workflow layer
(qe_factory.workflow) builds on it."""
