"""Code generation: every block and head as Python (``modules``), the standalone ``program.py``
(``program``) and the artifacts written next to them (``artifacts``, ``graph``, ``onnx``)."""
