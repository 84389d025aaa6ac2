"""The workflow layer: jobflow Makers and Flows compiled to FireWorks workflows, the factory home, the LaunchPad
and JobStore, the in-process worker. Built on qe_factory.engine; all FireWorks/jobflow internals it needs are in
fireworks_adapter.py."""
